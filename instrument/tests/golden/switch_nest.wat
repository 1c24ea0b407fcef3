;; options: unwind_only
;; A dispatch loop as clang lowers a `switch`: blocks opened back to back
;; before a `br_table`, each case calling a function that can unwind. The
;; unwind-only variant, which a program starts on.
(module
  (func $op (param i32) (result i32)
    (loop $spin
      local.get 0
      i32.const 1
      i32.sub
      local.tee 0
      br_if $spin)
    local.get 0)
  (func $run (export "_start")
    (local $pc i32) (local $acc i32)
    (loop $dispatch
      (block $done
        (block $c2
          (block $c1
            (block $c0
              local.get $pc
              br_table $c0 $c1 $c2 $done)
            local.get $acc
            call $op
            local.set $acc
            br $dispatch)
          local.get $acc
          i32.const 2
          i32.add
          call $op
          local.set $acc
          br $dispatch)
        local.get $pc
        i32.const 1
        i32.add
        local.set $pc
        br $dispatch))))
