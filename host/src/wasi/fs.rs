//! Files and directories, reached only through preopened directories.
//!
//! Every path is resolved by cap-std relative to a directory fd, which
//! refuses `..` past that directory, absolute paths, and symlinks that lead
//! outside it; the guest sees those refusals as ENOTCAPABLE.

use std::io::{Seek, SeekFrom};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use cap_fs_ext::{DirExt, FollowSymlinks, OpenOptionsFollowExt, OpenOptionsMaybeDirExt, OpenOptionsSyncExt, SystemTimeSpec};
use cap_std::fs::{MetadataExt, OpenOptionsExt};

use super::abi::{fdflags, filetype, fstflags, layout, oflags, rights, whence, Errno, LOOKUP_SYMLINK_FOLLOW};
use super::abi::{PREOPENTYPE_DIR, PREOPENTYPE_OTHER};
use super::fd_table::{host_mode_filetype, Object, OpenDir, OpenFile, OpenPipe};
use super::io::MAX_IO_CHUNK;
use super::memory::{iovecs_len, GuestMemory};
use super::pipe::{self, Opened};
use super::{CallResult, WasiCtx};

/// One entry of a directory listing, as `fd_readdir` reports it.
#[derive(Debug, Clone)]
pub struct DirListing {
    name: Vec<u8>,
    ino: u64,
    kind: u8,
}

fn dir_of(ctx: &WasiCtx, fd: u32) -> CallResult<Arc<OpenDir>> {
    match &ctx.fds.get(fd)?.object {
        Object::Dir(d) => Ok(d.clone()),
        _ => Err(Errno::NOTDIR.into()),
    }
}

fn file_of(ctx: &WasiCtx, fd: u32) -> CallResult<Arc<OpenFile>> {
    match &ctx.fds.get(fd)?.object {
        Object::File(f) => Ok(f.clone()),
        Object::Dir(_) => Err(Errno::ISDIR.into()),
        Object::Std(_) | Object::Pipe(_) | Object::Stream(_) | Object::Listener(_) => Err(Errno::SPIPE.into()),
    }
}

fn host_fd(object: &Object) -> BorrowedFd<'_> {
    match object {
        Object::Std(s) => s.host_fd(),
        Object::File(f) => f.file.as_fd(),
        Object::Pipe(p) => p.described().as_fd(),
        Object::Dir(d) => d.dir.as_fd(),
        Object::Listener(l) => l.socket.as_fd(),
        Object::Stream(s) => s.socket.as_fd(),
    }
}

fn read_path(mem: &GuestMemory<'_>, ptr: u32, len: u32) -> CallResult<String> {
    Ok(mem.read_str(ptr, len)?)
}

fn encode_filestat(dev: u64, ino: u64, kind: u8, nlink: u64, size: u64, times: [(i64, i64); 3]) -> [u8; layout::FILESTAT_SIZE] {
    let ns = |(s, n): (i64, i64)| (s as u64).wrapping_mul(1_000_000_000).wrapping_add(n as u64);
    let mut buf = [0u8; layout::FILESTAT_SIZE];
    buf[0..8].copy_from_slice(&dev.to_le_bytes());
    buf[8..16].copy_from_slice(&ino.to_le_bytes());
    buf[16] = kind;
    buf[24..32].copy_from_slice(&nlink.to_le_bytes());
    buf[32..40].copy_from_slice(&size.to_le_bytes());
    for (i, t) in times.into_iter().enumerate() {
        buf[40 + 8 * i..48 + 8 * i].copy_from_slice(&ns(t).to_le_bytes());
    }
    buf
}

/// `fd_filestat_get`: works on every kind of fd.
pub fn fd_filestat_get(ctx: &mut WasiCtx, mem: &mut GuestMemory<'_>, fd: u32, out: u32) -> CallResult {
    let desc = ctx.fds.get(fd)?;
    let st = rustix::fs::fstat(host_fd(&desc.object)).map_err(std::io::Error::from)?;
    let kind = match &desc.object {
        Object::Std(_) => desc.object.filetype(),
        _ => host_mode_filetype(st.st_mode),
    };
    let buf = encode_filestat(
        st.st_dev,
        st.st_ino,
        kind,
        st.st_nlink,
        st.st_size as u64,
        [
            (st.st_atime, st.st_atime_nsec as i64),
            (st.st_mtime, st.st_mtime_nsec as i64),
            (st.st_ctime, st.st_ctime_nsec as i64),
        ],
    );
    mem.write(out, &buf)?;
    Ok(())
}

/// `path_filestat_get`
pub fn path_filestat_get(ctx: &mut WasiCtx, mem: &mut GuestMemory<'_>, fd: u32, flags: u32, path: u32, len: u32, out: u32) -> CallResult {
    let dir = dir_of(ctx, fd)?;
    let path = read_path(mem, path, len)?;
    let meta = if flags & LOOKUP_SYMLINK_FOLLOW != 0 {
        dir.dir.metadata(&path)?
    } else {
        dir.dir.symlink_metadata(&path)?
    };
    let buf = encode_filestat(
        meta.dev(),
        meta.ino(),
        host_mode_filetype(meta.mode()),
        meta.nlink(),
        meta.len(),
        [
            (meta.atime(), meta.atime_nsec()),
            (meta.mtime(), meta.mtime_nsec()),
            (meta.ctime(), meta.ctime_nsec()),
        ],
    );
    mem.write(out, &buf)?;
    Ok(())
}

/// `fd_prestat_get`. Open fds that are not preopened directories answer
/// with a non-directory tag instead of EBADF: see [`PREOPENTYPE_OTHER`].
pub fn fd_prestat_get(ctx: &mut WasiCtx, mem: &mut GuestMemory<'_>, fd: u32, out: u32) -> CallResult {
    let mut buf = [0u8; layout::PRESTAT_SIZE];
    match &ctx.fds.get(fd)?.object {
        Object::Dir(d) if d.preopen_name.is_some() => {
            let name = d.preopen_name.as_deref().unwrap_or_default();
            buf[0] = PREOPENTYPE_DIR;
            buf[4..8].copy_from_slice(&(name.len() as u32).to_le_bytes());
        }
        _ if fd < 3 => return Err(Errno::BADF.into()),
        _ => buf[0] = PREOPENTYPE_OTHER,
    }
    mem.write(out, &buf)?;
    Ok(())
}

/// `fd_prestat_dir_name`
pub fn fd_prestat_dir_name(ctx: &mut WasiCtx, mem: &mut GuestMemory<'_>, fd: u32, path: u32, len: u32) -> CallResult {
    let dir = dir_of(ctx, fd)?;
    let name = dir.preopen_name.as_deref().ok_or(Errno::BADF)?;
    if (len as usize) < name.len() {
        return Err(Errno::NAMETOOLONG.into());
    }
    mem.write(path, name.as_bytes())?;
    Ok(())
}

/// The path of `rel` as the guest would name it, for descriptions of the
/// fd table (snapshots, status).
fn guest_path(parent: &OpenDir, rel: &str) -> String {
    let base = parent.preopen_name.as_deref().unwrap_or(&parent.guest_path);
    if base.is_empty() || base == "." {
        rel.to_string()
    } else {
        format!("{}/{rel}", base.trim_end_matches('/'))
    }
}

/// The metadata of `path` below `dir`, of a final symlink itself unless
/// `follow` says to follow it.
pub(super) fn metadata_at(dir: &cap_std::fs::Dir, path: &str, follow: FollowSymlinks) -> std::io::Result<cap_std::fs::Metadata> {
    match follow {
        FollowSymlinks::Yes => dir.metadata(path),
        FollowSymlinks::No => dir.symlink_metadata(path),
    }
}

/// `path_open`. Read and write access follow the FD_READ and FD_WRITE
/// rights wasi-libc derives from O_RDONLY/O_WRONLY; everything else about
/// access is left to the host OS inside the sandbox. Nothing is opened in a
/// way that waits in the kernel: see [`pipe`] for named pipes and devices.
#[allow(clippy::too_many_arguments)]
pub fn path_open(
    ctx: &mut WasiCtx,
    mem: &mut GuestMemory<'_>,
    fd: u32,
    dirflags: u32,
    path: u32,
    len: u32,
    oflags: u32,
    base: u64,
    _inheriting: u64,
    fdflags: u32,
    out: u32,
) -> CallResult {
    let parent = dir_of(ctx, fd)?;
    let path = read_path(mem, path, len)?;
    let oflags = u16::try_from(oflags).map_err(|_| Errno::INVAL)?;
    let fdflags = u16::try_from(fdflags).map_err(|_| Errno::INVAL)?;
    let follow = if dirflags & LOOKUP_SYMLINK_FOLLOW != 0 { FollowSymlinks::Yes } else { FollowSymlinks::No };
    let append = fdflags & fdflags::APPEND != 0;
    let writable = base & rights::FD_WRITE != 0 || append;
    let readable = base & (rights::FD_READ | rights::FD_READDIR) != 0 || !writable;
    let display = guest_path(&parent, &path);

    if oflags & oflags::DIRECTORY != 0 {
        // open(2) cannot create a directory (EINVAL, as Linux and wasmtime
        // say). Asking to write a directory as a file is refused; a
        // directory's own rights (fd_fdstat_get) do not include writing, so
        // programs that reopen a directory with its rights get it.
        if oflags & oflags::CREAT != 0 {
            return Err(Errno::INVAL.into());
        }
        if writable || oflags & oflags::TRUNC != 0 {
            return Err(Errno::ISDIR.into());
        }
        let dir = match follow {
            FollowSymlinks::Yes => parent.dir.open_dir(&path)?,
            FollowSymlinks::No => parent.dir.open_dir_nofollow(&path)?,
        };
        return install_dir(ctx, mem, dir, display, fdflags, out);
    }

    let truncate = oflags & oflags::TRUNC != 0;
    // Rust's open refuses append with truncate, which POSIX allows
    // (`O_TRUNC|O_APPEND`): such a file opens for writing, and append mode
    // is set on it once open.
    let append_after_open = append && truncate;
    let (write, append) = if append_after_open { (true, false) } else { (writable && !append, append) };
    let mut opts = cap_std::fs::OpenOptions::new();
    opts.read(readable).write(write).append(append);
    if oflags & oflags::CREAT != 0 {
        let mut create = cap_std::fs::OpenOptions::new();
        create.follow(follow);
        if oflags & oflags::EXCL != 0 {
            create.create_new(true);
        } else {
            create.create(true);
        }
        if writable {
            opts = create.read(readable).write(write).append(append).clone();
        } else {
            // POSIX creates a file opened read-only (`O_CREAT|O_RDONLY`, and
            // path_open with no rights at all); Rust's open refuses create
            // without write access, so the file is created first, then
            // opened as asked. Non-blocking, so that an existing FIFO with
            // no reader does not wait here: ENXIO says it exists, which is
            // all this step is for.
            create.write(true).custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32);
            match parent.dir.open_with(&path, &create) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NXIO.raw_os_error()) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    if truncate && !write && !append {
        // O_RDONLY|O_TRUNC truncates a regular file on Linux (POSIX leaves
        // it open), and wasmtime does the same; Rust's open refuses
        // truncation without write access, so it is done through a writing
        // open first. Only for a regular file: Linux ignores O_TRUNC on
        // anything else, and opening a FIFO for writing could block.
        if metadata_at(&parent.dir, &path, follow).is_ok_and(|m| m.is_file()) {
            let mut trunc = cap_std::fs::OpenOptions::new();
            trunc.write(true).truncate(true).follow(follow);
            drop(parent.dir.open_with(&path, &trunc)?);
        }
    } else {
        opts.truncate(truncate);
    }
    // The synchronous-write flags are the host file's own: they can only
    // be set when it is opened (F_SETFL ignores them).
    opts.sync(fdflags & fdflags::SYNC != 0).dsync(fdflags & fdflags::DSYNC != 0).rsync(fdflags & fdflags::RSYNC != 0);
    opts.follow(follow);
    opts.maybe_dir(true);
    let guest_blocking = fdflags & fdflags::NONBLOCK == 0;
    let file = match pipe::open(&parent.dir, &path, &opts, follow, !readable, guest_blocking)? {
        Opened::File(file) => file,
        Opened::Pipe { file, pending, fifo } => {
            let open = OpenPipe {
                file,
                pending,
                guest_path: display,
                readable,
                writable,
                fifo,
                opened_blocking: guest_blocking,
            };
            let new_fd = ctx.fds.insert(Object::Pipe(Arc::new(open)), fdflags)?;
            mem.write_u32(out, new_fd)?;
            return Ok(());
        }
    };
    if append_after_open {
        let flags = rustix::fs::fcntl_getfl(&file).map_err(std::io::Error::from)?;
        rustix::fs::fcntl_setfl(&file, flags | rustix::fs::OFlags::APPEND).map_err(std::io::Error::from)?;
    }
    if file.metadata()?.is_dir() {
        if writable {
            return Err(Errno::ISDIR.into());
        }
        let dir = cap_std::fs::Dir::from_std_file(file.into_std());
        return install_dir(ctx, mem, dir, display, fdflags, out);
    }
    let open = OpenFile {
        file: file.into_std(),
        guest_path: display,
        readable,
        writable,
    };
    let new_fd = ctx.fds.insert(Object::File(Arc::new(open)), fdflags)?;
    mem.write_u32(out, new_fd)?;
    Ok(())
}

fn install_dir(ctx: &mut WasiCtx, mem: &mut GuestMemory<'_>, dir: cap_std::fs::Dir, guest_path: String, flags: u16, out: u32) -> CallResult {
    let open = OpenDir {
        dir,
        preopen_name: None,
        host_path: None,
        guest_path,
        listing: Default::default(),
    };
    let new_fd = ctx.fds.insert(Object::Dir(Arc::new(open)), flags)?;
    mem.write_u32(out, new_fd)?;
    Ok(())
}

fn list_dir(dir: &cap_std::fs::Dir) -> CallResult<Vec<DirListing>> {
    let mut entries = Vec::new();
    for entry in dir.entries()? {
        let entry = entry?;
        let meta = entry.metadata().ok();
        entries.push(DirListing {
            name: entry.file_name().as_bytes().to_vec(),
            ino: meta.as_ref().map_or(0, |m| m.ino()),
            kind: meta.as_ref().map_or(filetype::UNKNOWN, |m| host_mode_filetype(m.mode())),
        });
    }
    // A stable order keeps cookies meaningful between calls.
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    // `.` is the directory itself, with its own inode (programs compare it
    // with fd_filestat_get); `..` may lie outside the sandbox, so its inode
    // is not looked up.
    let own = dir.dir_metadata().map(|m| m.ino()).unwrap_or(0);
    let dot = |name: &[u8], ino| DirListing { name: name.to_vec(), ino, kind: filetype::DIRECTORY };
    let mut all = vec![dot(b".", own), dot(b"..", 0)];
    all.extend(entries);
    Ok(all)
}

/// `fd_readdir`: the cookie is the index of the next entry in the listing
/// taken when the guest started over at cookie 0.
pub fn fd_readdir(ctx: &mut WasiCtx, mem: &mut GuestMemory<'_>, fd: u32, buf: u32, len: u32, cookie: u64, out: u32) -> CallResult {
    let dir = dir_of(ctx, fd)?;
    let mut listing = dir.listing.lock().map_err(|_| Errno::IO)?;
    if cookie == 0 || listing.is_empty() {
        *listing = list_dir(&dir.dir)?;
    }
    let mut bytes = Vec::new();
    for (i, entry) in listing.iter().enumerate().skip(cookie as usize) {
        if bytes.len() >= len as usize {
            break;
        }
        let mut header = [0u8; layout::DIRENT_SIZE];
        header[0..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
        header[8..16].copy_from_slice(&entry.ino.to_le_bytes());
        header[16..20].copy_from_slice(&(entry.name.len() as u32).to_le_bytes());
        header[20] = entry.kind;
        bytes.extend_from_slice(&header);
        bytes.extend_from_slice(&entry.name);
    }
    // A full buffer tells the guest to call again from the last cookie.
    bytes.truncate(len as usize);
    mem.write(buf, &bytes)?;
    mem.write_u32(out, bytes.len() as u32)?;
    Ok(())
}

/// Moves the offset of a file, or of a device as the host does (`/dev/null`
/// seeks; a terminal or a FIFO gives ESPIPE).
fn seek(ctx: &WasiCtx, fd: u32, pos: impl FnOnce() -> CallResult<SeekFrom>) -> CallResult<u64> {
    if let Object::Pipe(p) = &ctx.fds.get(fd)?.object {
        return match p.io() {
            Some(device) if !p.fifo => Ok((&*device).seek(pos()?)?),
            _ => Err(Errno::SPIPE.into()),
        };
    }
    let file = file_of(ctx, fd)?;
    Ok((&file.file).seek(pos()?)?)
}

/// `fd_seek`
pub fn fd_seek(ctx: &mut WasiCtx, mem: &mut GuestMemory<'_>, fd: u32, offset: i64, how: u32, out: u32) -> CallResult {
    let new = seek(ctx, fd, || {
        Ok(match how as u8 {
            whence::SET => SeekFrom::Start(u64::try_from(offset).map_err(|_| Errno::INVAL)?),
            whence::CUR => SeekFrom::Current(offset),
            whence::END => SeekFrom::End(offset),
            _ => return Err(Errno::INVAL.into()),
        })
    })?;
    mem.write_u64(out, new)?;
    Ok(())
}

/// `fd_tell`
pub fn fd_tell(ctx: &mut WasiCtx, mem: &mut GuestMemory<'_>, fd: u32, out: u32) -> CallResult {
    let pos = seek(ctx, fd, || Ok(SeekFrom::Current(0)))?;
    mem.write_u64(out, pos)?;
    Ok(())
}

/// `fd_pread`
pub fn fd_pread(ctx: &mut WasiCtx, mem: &mut GuestMemory<'_>, fd: u32, iovs: u32, iovs_len: u32, offset: u64, out: u32) -> CallResult {
    let file = file_of(ctx, fd)?;
    let iovs = mem.iovecs(iovs, iovs_len)?;
    let mut buf = vec![0u8; iovecs_len(&iovs).min(MAX_IO_CHUNK)];
    let n = file.file.read_at(&mut buf, offset)?;
    mem.scatter(&iovs, &buf[..n])?;
    mem.write_u32(out, n as u32)?;
    Ok(())
}

/// `fd_pwrite`
pub fn fd_pwrite(ctx: &mut WasiCtx, mem: &mut GuestMemory<'_>, fd: u32, iovs: u32, iovs_len: u32, offset: u64, out: u32) -> CallResult {
    let file = file_of(ctx, fd)?;
    let iovs = mem.iovecs(iovs, iovs_len)?;
    let data = mem.gather(&iovs)?;
    file.file.write_all_at(&data, offset)?;
    mem.write_u32(out, data.len() as u32)?;
    Ok(())
}

/// The directory itself, opened for reading: the handle the fd table
/// holds may be an O_PATH one (cap-std opens directories so), which can
/// neither be synced nor given times.
fn readable_dir(dir: &OpenDir) -> std::io::Result<std::os::fd::OwnedFd> {
    use rustix::fs::{Mode, OFlags};
    Ok(rustix::fs::openat(&dir.dir, ".", OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?)
}

/// `fd_sync`: on a directory, makes its entries durable (a rename or a
/// creation in it), as fsync(2) does.
pub fn fd_sync(ctx: &mut WasiCtx, _: &mut GuestMemory<'_>, fd: u32) -> CallResult {
    match &ctx.fds.get(fd)?.object {
        Object::File(f) => f.file.sync_all()?,
        Object::Dir(d) => rustix::fs::fsync(readable_dir(d)?).map_err(std::io::Error::from)?,
        _ => return Err(Errno::INVAL.into()),
    }
    Ok(())
}

/// `fd_datasync`
pub fn fd_datasync(ctx: &mut WasiCtx, _: &mut GuestMemory<'_>, fd: u32) -> CallResult {
    file_of(ctx, fd)?.file.sync_data()?;
    Ok(())
}

/// `fd_advise`: advice is optional; it is checked and ignored.
pub fn fd_advise(ctx: &mut WasiCtx, _: &mut GuestMemory<'_>, fd: u32, _offset: u64, _len: u64, advice: u32) -> CallResult {
    file_of(ctx, fd)?;
    if advice > 5 {
        return Err(Errno::INVAL.into());
    }
    Ok(())
}

/// `fd_allocate`: grows the file to cover the range.
pub fn fd_allocate(ctx: &mut WasiCtx, _: &mut GuestMemory<'_>, fd: u32, offset: u64, len: u64) -> CallResult {
    let file = file_of(ctx, fd)?;
    let end = offset.checked_add(len).ok_or(Errno::FBIG)?;
    if file.file.metadata()?.len() < end {
        file.file.set_len(end)?;
    }
    Ok(())
}

/// `fd_filestat_set_size`
pub fn fd_filestat_set_size(ctx: &mut WasiCtx, _: &mut GuestMemory<'_>, fd: u32, size: u64) -> CallResult {
    file_of(ctx, fd)?.file.set_len(size)?;
    Ok(())
}

fn time_spec(ns: u64, flags: u16, set: u16, now: u16) -> CallResult<Option<SystemTimeSpec>> {
    match (flags & set != 0, flags & now != 0) {
        (true, true) => Err(Errno::INVAL.into()),
        (true, false) => Ok(Some(SystemTimeSpec::Absolute(cap_std::time::SystemTime::from_std(UNIX_EPOCH + Duration::from_nanos(ns))))),
        (false, true) => Ok(Some(SystemTimeSpec::SymbolicNow)),
        (false, false) => Ok(None),
    }
}

fn to_timestamp(spec: Option<SystemTimeSpec>) -> rustix::fs::Timespec {
    match spec {
        None => rustix::fs::Timespec { tv_sec: 0, tv_nsec: rustix::fs::UTIME_OMIT },
        Some(SystemTimeSpec::SymbolicNow) => rustix::fs::Timespec { tv_sec: 0, tv_nsec: rustix::fs::UTIME_NOW },
        Some(SystemTimeSpec::Absolute(t)) => {
            let d = t.into_std().duration_since(UNIX_EPOCH).unwrap_or_default();
            rustix::fs::Timespec { tv_sec: d.as_secs() as i64, tv_nsec: d.subsec_nanos() as _ }
        }
    }
}

/// `fd_filestat_set_times`
pub fn fd_filestat_set_times(ctx: &mut WasiCtx, _: &mut GuestMemory<'_>, fd: u32, atim: u64, mtim: u64, flags: u32) -> CallResult {
    let flags = flags as u16;
    let desc = ctx.fds.get(fd)?;
    let times = rustix::fs::Timestamps {
        last_access: to_timestamp(time_spec(atim, flags, fstflags::ATIM, fstflags::ATIM_NOW)?),
        last_modification: to_timestamp(time_spec(mtim, flags, fstflags::MTIM, fstflags::MTIM_NOW)?),
    };
    match &desc.object {
        Object::Dir(d) => rustix::fs::futimens(readable_dir(d)?, &times),
        object => rustix::fs::futimens(host_fd(object), &times),
    }
    .map_err(std::io::Error::from)?;
    Ok(())
}

/// `path_filestat_set_times`
#[allow(clippy::too_many_arguments)]
pub fn path_filestat_set_times(ctx: &mut WasiCtx, mem: &mut GuestMemory<'_>, fd: u32, lookup: u32, path: u32, len: u32, atim: u64, mtim: u64, flags: u32) -> CallResult {
    let dir = dir_of(ctx, fd)?;
    let path = read_path(mem, path, len)?;
    let flags = flags as u16;
    let a = time_spec(atim, flags, fstflags::ATIM, fstflags::ATIM_NOW)?;
    let m = time_spec(mtim, flags, fstflags::MTIM, fstflags::MTIM_NOW)?;
    if lookup & LOOKUP_SYMLINK_FOLLOW != 0 {
        dir.dir.set_times(&path, a, m)?;
    } else {
        dir.dir.set_symlink_times(&path, a, m)?;
    }
    Ok(())
}

/// `path_create_directory`
pub fn path_create_directory(ctx: &mut WasiCtx, mem: &mut GuestMemory<'_>, fd: u32, path: u32, len: u32) -> CallResult {
    let dir = dir_of(ctx, fd)?;
    dir.dir.create_dir(read_path(mem, path, len)?)?;
    Ok(())
}

/// `path_remove_directory`
pub fn path_remove_directory(ctx: &mut WasiCtx, mem: &mut GuestMemory<'_>, fd: u32, path: u32, len: u32) -> CallResult {
    let dir = dir_of(ctx, fd)?;
    dir.dir.remove_dir(read_path(mem, path, len)?)?;
    Ok(())
}

/// `path_unlink_file`
pub fn path_unlink_file(ctx: &mut WasiCtx, mem: &mut GuestMemory<'_>, fd: u32, path: u32, len: u32) -> CallResult {
    let dir = dir_of(ctx, fd)?;
    dir.dir.remove_file(read_path(mem, path, len)?)?;
    Ok(())
}

/// `path_rename`
pub fn path_rename(ctx: &mut WasiCtx, mem: &mut GuestMemory<'_>, fd: u32, old: u32, old_len: u32, new_fd: u32, new: u32, new_len: u32) -> CallResult {
    let from = dir_of(ctx, fd)?;
    let to = dir_of(ctx, new_fd)?;
    let (old, new) = (read_path(mem, old, old_len)?, read_path(mem, new, new_len)?);
    // A trailing slash makes the new name a directory's; the path layer
    // drops it, so a file renamed to `name/` is refused here, as rename(2)
    // refuses it (ENOTDIR).
    if new.ends_with('/') && !old.ends_with('/') && from.dir.symlink_metadata(&old).is_ok_and(|m| !m.is_dir()) {
        return Err(Errno::NOTDIR.into());
    }
    from.dir.rename(old, &to.dir, new)?;
    Ok(())
}

/// `path_link`: hard links never follow a final symlink (as linkat without
/// AT_SYMLINK_FOLLOW); asking to follow one is EINVAL.
#[allow(clippy::too_many_arguments)]
pub fn path_link(ctx: &mut WasiCtx, mem: &mut GuestMemory<'_>, old_fd: u32, flags: u32, old: u32, old_len: u32, new_fd: u32, new: u32, new_len: u32) -> CallResult {
    // Following would link whatever the symlink names, which may lie
    // outside what the guest can see; wasmtime refuses it the same way.
    if flags & LOOKUP_SYMLINK_FOLLOW != 0 {
        return Err(Errno::INVAL.into());
    }
    let from = dir_of(ctx, old_fd)?;
    let to = dir_of(ctx, new_fd)?;
    from.dir.hard_link(read_path(mem, old, old_len)?, &to.dir, read_path(mem, new, new_len)?)?;
    Ok(())
}

/// `path_symlink`: a relative target is stored as given, even one that
/// points out (following it later is still confined to the sandbox); an
/// absolute one is refused (ENOTCAPABLE) by the path layer.
pub fn path_symlink(ctx: &mut WasiCtx, mem: &mut GuestMemory<'_>, old: u32, old_len: u32, fd: u32, new: u32, new_len: u32) -> CallResult {
    let dir = dir_of(ctx, fd)?;
    let target = read_path(mem, old, old_len)?;
    let link = read_path(mem, new, new_len)?;
    DirExt::symlink(&dir.dir, target, link)?;
    Ok(())
}

/// `path_readlink`: truncates to the buffer, as readlink(2) does.
pub fn path_readlink(ctx: &mut WasiCtx, mem: &mut GuestMemory<'_>, fd: u32, path: u32, len: u32, buf: u32, buf_len: u32, out: u32) -> CallResult {
    let dir = dir_of(ctx, fd)?;
    let target = dir.dir.read_link(read_path(mem, path, len)?)?;
    let bytes = target.as_os_str().as_bytes();
    let n = bytes.len().min(buf_len as usize);
    mem.write(buf, &bytes[..n])?;
    mem.write_u32(out, n as u32)?;
    Ok(())
}
