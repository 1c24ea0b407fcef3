;; A wait on a shared memory: lowered to a call of the host's futex import,
;; an update point like a blocking call, the defined functions moved up by
;; the new import.
(module
  (import "env" "memory" (memory 1 1 shared))
  (func $wait (export "wait") (param $p i32) (result i32)
    local.get $p
    i32.const 0
    i64.const -1
    memory.atomic.wait32)
  (func $waiter (export "_start")
    (loop $l
      i32.const 64
      call $wait
      br_if $l)))
