;; Function references where the renumbering must follow them: an element
;; segment, a `ref.func` in a global's initialiser and in code, a funcref
;; local live across a loop (a side table holds it in a frame), and an
;; allocator with C's signatures (batch helpers that call it).
(module
  (type $unary (func (param i32) (result i32)))
  (memory (export "memory") 1)
  (table 2 funcref)
  (elem (i32.const 0) func $twice $malloc)
  (global $chosen (mut funcref) (ref.func $twice))
  (func $malloc (export "malloc") (param i32) (result i32)
    local.get 0)
  (func $free (export "free") (param i32))
  (func $twice (param i32) (result i32)
    local.get 0
    i32.const 2
    i32.mul)
  (func $main (export "_start")
    (local $f funcref) (local $i i32)
    ref.func $twice
    local.set $f
    (loop $l
      local.get $i
      i32.const 0
      call_indirect (type $unary)
      local.set $i
      local.get $f
      global.set $chosen
      local.get $i
      i32.const 100
      i32.lt_u
      br_if $l)))
