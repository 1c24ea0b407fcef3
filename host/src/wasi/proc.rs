//! Process-level calls: arguments, environment, clocks, randomness,
//! scheduling and signals.

use std::time::{SystemTime, UNIX_EPOCH};

use rustix::time::ClockId;

use super::abi::{clockid, Errno};
use super::memory::GuestMemory;
use super::{CallResult, WasiCtx};

/// Writes a list of strings as C strings into `buf` with pointers at `ptrs`.
fn write_strings(mem: &mut GuestMemory<'_>, items: &[String], ptrs: u32, buf: u32) -> CallResult {
    let mut at = buf;
    for (i, item) in items.iter().enumerate() {
        mem.write_u32(ptrs + 4 * i as u32, at)?;
        mem.write(at, item.as_bytes())?;
        mem.write(at + item.len() as u32, &[0])?;
        at += item.len() as u32 + 1;
    }
    Ok(())
}

fn write_sizes(mem: &mut GuestMemory<'_>, items: &[String], count: u32, size: u32) -> CallResult {
    let total: usize = items.iter().map(|s| s.len() + 1).sum();
    mem.write_u32(count, items.len() as u32)?;
    mem.write_u32(size, u32::try_from(total).map_err(|_| Errno::TOOBIG)?)?;
    Ok(())
}

fn env_strings(ctx: &WasiCtx) -> Vec<String> {
    ctx.env.iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// `args_get`
pub fn args_get(ctx: &mut WasiCtx, mem: &mut GuestMemory<'_>, argv: u32, buf: u32) -> CallResult {
    write_strings(mem, &ctx.args, argv, buf)
}

/// `args_sizes_get`
pub fn args_sizes_get(ctx: &mut WasiCtx, mem: &mut GuestMemory<'_>, count: u32, size: u32) -> CallResult {
    write_sizes(mem, &ctx.args, count, size)
}

/// `environ_get`
pub fn environ_get(ctx: &mut WasiCtx, mem: &mut GuestMemory<'_>, environ: u32, buf: u32) -> CallResult {
    write_strings(mem, &env_strings(ctx), environ, buf)
}

/// `environ_sizes_get`
pub fn environ_sizes_get(ctx: &mut WasiCtx, mem: &mut GuestMemory<'_>, count: u32, size: u32) -> CallResult {
    write_sizes(mem, &env_strings(ctx), count, size)
}

fn host_clock(id: u32) -> Result<ClockId, Errno> {
    match id {
        clockid::REALTIME => Ok(ClockId::Realtime),
        clockid::MONOTONIC => Ok(ClockId::Monotonic),
        clockid::PROCESS_CPUTIME => Ok(ClockId::ProcessCPUTime),
        clockid::THREAD_CPUTIME => Ok(ClockId::ThreadCPUTime),
        _ => Err(Errno::INVAL),
    }
}

/// The current time of a preview1 clock in nanoseconds.
pub fn now_ns(id: u32) -> Result<u64, Errno> {
    if id == clockid::REALTIME {
        let d = SystemTime::now().duration_since(UNIX_EPOCH).map_err(|_| Errno::IO)?;
        return Ok(d.as_nanos() as u64);
    }
    let ts = rustix::time::clock_gettime(host_clock(id)?);
    Ok(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// `clock_res_get`
pub fn clock_res_get(_: &mut WasiCtx, mem: &mut GuestMemory<'_>, id: u32, out: u32) -> CallResult {
    host_clock(id)?;
    mem.write_u64(out, 1)?;
    Ok(())
}

/// `clock_time_get`
pub fn clock_time_get(_: &mut WasiCtx, mem: &mut GuestMemory<'_>, id: u32, _precision: u64, out: u32) -> CallResult {
    mem.write_u64(out, now_ns(id)?)?;
    Ok(())
}

/// `random_get`
pub fn random_get(_: &mut WasiCtx, mem: &mut GuestMemory<'_>, buf: u32, len: u32) -> CallResult {
    // Checked before the bytes are made: a bad buffer is EFAULT, whatever
    // its size.
    mem.check(buf, len)?;
    let mut bytes = vec![0; len as usize];
    let mut filled = 0;
    while filled < bytes.len() {
        filled += rustix::rand::getrandom(&mut bytes[filled..], rustix::rand::GetRandomFlags::empty())
            .map_err(|e| Errno::from(std::io::Error::from(e)))?;
    }
    mem.write(buf, &bytes)?;
    Ok(())
}

/// `sched_yield`
pub fn sched_yield(_: &mut WasiCtx, _: &mut GuestMemory<'_>) -> CallResult {
    std::thread::yield_now();
    Ok(())
}

/// `proc_raise`: signals are not part of the sandbox.
pub fn proc_raise(_: &mut WasiCtx, _: &mut GuestMemory<'_>, _sig: u32) -> CallResult {
    Err(Errno::NOSYS.into())
}
