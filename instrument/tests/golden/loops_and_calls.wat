;; A loop that calls a function with a loop of its own, a float and an
;; integer live across the call, and a blocking import: update points at
;; loop headers, at calls of functions that can unwind and at the import.
(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func $count (param $n i32) (result i32)
    (local $i i32)
    (loop $l
      local.get $i
      i32.const 1
      i32.add
      local.tee $i
      local.get $n
      i32.lt_u
      br_if $l)
    local.get $i)
  (func $main (export "_start")
    (local $i i32) (local $sum f64)
    (loop $l
      local.get $sum
      local.get $i
      call $count
      f64.convert_i32_u
      f64.add
      local.set $sum
      i32.const 0 i32.const 0 i32.const 0 i32.const 0
      call $poll
      drop
      local.get $i
      i32.const 1
      i32.add
      local.tee $i
      i32.const 10
      i32.lt_u
      br_if $l)))
