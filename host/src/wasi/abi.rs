//! The `wasi_snapshot_preview1` ABI: errno values, flags, file types and the
//! byte layouts of the structs the guest passes by pointer.
//!
//! Values come from the preview1 witx definitions; every number the guest
//! sees is defined here and nowhere else.

use std::io;

/// A preview1 errno. `Errno(0)` is success and is never returned as an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub u16);

#[allow(missing_docs)]
impl Errno {
    pub const SUCCESS: Errno = Errno(0);
    pub const TOOBIG: Errno = Errno(1);
    pub const ACCES: Errno = Errno(2);
    pub const ADDRINUSE: Errno = Errno(3);
    pub const ADDRNOTAVAIL: Errno = Errno(4);
    pub const AGAIN: Errno = Errno(6);
    pub const ALREADY: Errno = Errno(7);
    pub const BADF: Errno = Errno(8);
    pub const BUSY: Errno = Errno(10);
    pub const CONNABORTED: Errno = Errno(13);
    pub const CONNREFUSED: Errno = Errno(14);
    pub const CONNRESET: Errno = Errno(15);
    pub const EXIST: Errno = Errno(20);
    pub const FAULT: Errno = Errno(21);
    pub const FBIG: Errno = Errno(22);
    pub const INTR: Errno = Errno(27);
    pub const INVAL: Errno = Errno(28);
    pub const IO: Errno = Errno(29);
    pub const ISCONN: Errno = Errno(30);
    pub const ISDIR: Errno = Errno(31);
    pub const LOOP: Errno = Errno(32);
    pub const MFILE: Errno = Errno(33);
    pub const NAMETOOLONG: Errno = Errno(37);
    pub const NOENT: Errno = Errno(44);
    pub const NOMEM: Errno = Errno(48);
    pub const NOSPC: Errno = Errno(51);
    pub const NOSYS: Errno = Errno(52);
    pub const NOTCONN: Errno = Errno(53);
    pub const NOTDIR: Errno = Errno(54);
    pub const NOTEMPTY: Errno = Errno(55);
    pub const NOTSOCK: Errno = Errno(57);
    pub const NOTSUP: Errno = Errno(58);
    pub const NOTTY: Errno = Errno(59);
    pub const NXIO: Errno = Errno(60);
    pub const OVERFLOW: Errno = Errno(61);
    pub const PERM: Errno = Errno(63);
    pub const PIPE: Errno = Errno(64);
    pub const ROFS: Errno = Errno(69);
    pub const SPIPE: Errno = Errno(70);
    pub const TIMEDOUT: Errno = Errno(73);
    pub const XDEV: Errno = Errno(75);
    pub const NOTCAPABLE: Errno = Errno(76);
}

impl From<io::Error> for Errno {
    fn from(err: io::Error) -> Self {
        if let Some(code) = err.raw_os_error() {
            return from_host_errno(code);
        }
        // cap-std reports sandbox escapes (`..` past the root, absolute paths,
        // symlinks leading out) as PermissionDenied without an OS code.
        match err.kind() {
            io::ErrorKind::PermissionDenied => Errno::NOTCAPABLE,
            io::ErrorKind::NotFound => Errno::NOENT,
            io::ErrorKind::AlreadyExists => Errno::EXIST,
            io::ErrorKind::WouldBlock => Errno::AGAIN,
            io::ErrorKind::InvalidInput => Errno::INVAL,
            io::ErrorKind::BrokenPipe => Errno::PIPE,
            io::ErrorKind::ConnectionReset => Errno::CONNRESET,
            io::ErrorKind::NotConnected => Errno::NOTCONN,
            io::ErrorKind::Interrupted => Errno::INTR,
            io::ErrorKind::Unsupported => Errno::NOTSUP,
            _ => Errno::IO,
        }
    }
}

/// Maps a host (Linux) errno to the preview1 one; both come from the same
/// POSIX names, but the numbers differ.
fn from_host_errno(code: i32) -> Errno {
    use rustix::io::Errno as H;
    let host = H::from_raw_os_error(code);
    let table: &[(H, Errno)] = &[
        (H::TOOBIG, Errno::TOOBIG),
        (H::ACCESS, Errno::ACCES),
        (H::ADDRINUSE, Errno::ADDRINUSE),
        (H::ADDRNOTAVAIL, Errno::ADDRNOTAVAIL),
        (H::AGAIN, Errno::AGAIN),
        (H::ALREADY, Errno::ALREADY),
        (H::BADF, Errno::BADF),
        (H::BUSY, Errno::BUSY),
        (H::CONNABORTED, Errno::CONNABORTED),
        (H::CONNREFUSED, Errno::CONNREFUSED),
        (H::CONNRESET, Errno::CONNRESET),
        (H::EXIST, Errno::EXIST),
        (H::FAULT, Errno::FAULT),
        (H::FBIG, Errno::FBIG),
        (H::INTR, Errno::INTR),
        (H::INVAL, Errno::INVAL),
        (H::IO, Errno::IO),
        (H::ISCONN, Errno::ISCONN),
        (H::ISDIR, Errno::ISDIR),
        (H::LOOP, Errno::LOOP),
        (H::MFILE, Errno::MFILE),
        (H::NAMETOOLONG, Errno::NAMETOOLONG),
        (H::NOENT, Errno::NOENT),
        (H::NXIO, Errno::NXIO),
        (H::NOMEM, Errno::NOMEM),
        (H::NOSPC, Errno::NOSPC),
        (H::NOSYS, Errno::NOSYS),
        (H::NOTCONN, Errno::NOTCONN),
        (H::NOTDIR, Errno::NOTDIR),
        (H::NOTEMPTY, Errno::NOTEMPTY),
        (H::NOTSOCK, Errno::NOTSOCK),
        (H::NOTSUP, Errno::NOTSUP),
        (H::NOTTY, Errno::NOTTY),
        (H::OVERFLOW, Errno::OVERFLOW),
        (H::PERM, Errno::PERM),
        (H::PIPE, Errno::PIPE),
        (H::ROFS, Errno::ROFS),
        (H::SPIPE, Errno::SPIPE),
        (H::TIMEDOUT, Errno::TIMEDOUT),
        (H::XDEV, Errno::XDEV),
    ];
    table
        .iter()
        .find(|(h, _)| *h == host)
        .map(|(_, e)| *e)
        .unwrap_or(Errno::IO)
}

/// `filetype`
#[allow(missing_docs)]
pub mod filetype {
    pub const UNKNOWN: u8 = 0;
    pub const CHARACTER_DEVICE: u8 = 2;
    pub const DIRECTORY: u8 = 3;
    pub const REGULAR_FILE: u8 = 4;
    pub const SOCKET_STREAM: u8 = 6;
    pub const SYMBOLIC_LINK: u8 = 7;
    pub const BLOCK_DEVICE: u8 = 1;
}

/// `fdflags`
#[allow(missing_docs)]
pub mod fdflags {
    pub const APPEND: u16 = 1;
    pub const DSYNC: u16 = 2;
    pub const NONBLOCK: u16 = 4;
    pub const RSYNC: u16 = 8;
    pub const SYNC: u16 = 16;
}

/// `oflags`
#[allow(missing_docs)]
pub mod oflags {
    pub const CREAT: u16 = 1;
    pub const DIRECTORY: u16 = 2;
    pub const EXCL: u16 = 4;
    pub const TRUNC: u16 = 8;
}

/// `lookupflags`
pub const LOOKUP_SYMLINK_FOLLOW: u32 = 1;

/// `rights`: the bits the host looks at when opening.
#[allow(missing_docs)]
pub mod rights {
    pub const FD_DATASYNC: u64 = 1 << 0;
    pub const FD_READ: u64 = 1 << 1;
    pub const FD_SEEK: u64 = 1 << 2;
    pub const FD_FDSTAT_SET_FLAGS: u64 = 1 << 3;
    pub const FD_SYNC: u64 = 1 << 4;
    pub const FD_TELL: u64 = 1 << 5;
    pub const FD_WRITE: u64 = 1 << 6;
    pub const FD_ADVISE: u64 = 1 << 7;
    pub const FD_ALLOCATE: u64 = 1 << 8;
    pub const PATH_CREATE_DIRECTORY: u64 = 1 << 9;
    pub const PATH_CREATE_FILE: u64 = 1 << 10;
    pub const PATH_LINK_SOURCE: u64 = 1 << 11;
    pub const PATH_LINK_TARGET: u64 = 1 << 12;
    pub const PATH_OPEN: u64 = 1 << 13;
    pub const FD_READDIR: u64 = 1 << 14;
    pub const PATH_READLINK: u64 = 1 << 15;
    pub const PATH_RENAME_SOURCE: u64 = 1 << 16;
    pub const PATH_RENAME_TARGET: u64 = 1 << 17;
    pub const PATH_FILESTAT_GET: u64 = 1 << 18;
    pub const PATH_FILESTAT_SET_TIMES: u64 = 1 << 20;
    pub const FD_FILESTAT_GET: u64 = 1 << 21;
    pub const FD_FILESTAT_SET_SIZE: u64 = 1 << 22;
    pub const FD_FILESTAT_SET_TIMES: u64 = 1 << 23;
    pub const PATH_SYMLINK: u64 = 1 << 24;
    pub const PATH_REMOVE_DIRECTORY: u64 = 1 << 25;
    pub const PATH_UNLINK_FILE: u64 = 1 << 26;
    pub const POLL_FD_READWRITE: u64 = 1 << 27;
    /// Every right defined by preview1.
    pub const ALL: u64 = (1 << 30) - 1;
    /// What a directory fd can do: work on paths below it and list itself;
    /// no reading, writing, seeking or resizing it as a file.
    pub const DIRECTORY: u64 = PATH_CREATE_DIRECTORY
        | PATH_CREATE_FILE
        | PATH_LINK_SOURCE
        | PATH_LINK_TARGET
        | PATH_OPEN
        | FD_READDIR
        | PATH_READLINK
        | PATH_RENAME_SOURCE
        | PATH_RENAME_TARGET
        | PATH_SYMLINK
        | PATH_REMOVE_DIRECTORY
        | PATH_UNLINK_FILE
        | PATH_FILESTAT_GET
        | PATH_FILESTAT_SET_TIMES
        | FD_FDSTAT_SET_FLAGS
        | FD_FILESTAT_GET
        | FD_FILESTAT_SET_TIMES;
    /// What every regular file fd can do, whatever its access mode.
    pub const FILE: u64 = FD_DATASYNC
        | FD_SEEK
        | FD_FDSTAT_SET_FLAGS
        | FD_SYNC
        | FD_TELL
        | FD_ADVISE
        | FD_FILESTAT_GET
        | FD_FILESTAT_SET_TIMES
        | POLL_FD_READWRITE;
    /// What a file fd opened for writing can do besides.
    pub const FILE_WRITE: u64 = FD_WRITE | FD_ALLOCATE | FD_FILESTAT_SET_SIZE;
}

/// `clockid`
#[allow(missing_docs)]
pub mod clockid {
    pub const REALTIME: u32 = 0;
    pub const MONOTONIC: u32 = 1;
    pub const PROCESS_CPUTIME: u32 = 2;
    pub const THREAD_CPUTIME: u32 = 3;
}

/// `eventtype`
#[allow(missing_docs)]
pub mod eventtype {
    pub const CLOCK: u8 = 0;
    pub const FD_READ: u8 = 1;
    pub const FD_WRITE: u8 = 2;
}

/// `subclockflags`: the timeout is an absolute time on its clock.
pub const SUBCLOCK_ABSTIME: u16 = 1;
/// `eventrwflags`: the peer hung up.
pub const EVENT_FD_READWRITE_HANGUP: u16 = 1;
/// `riflags`: look at the data without consuming it.
pub const RECV_PEEK: u16 = 1;
/// `riflags`: wait until the whole buffer is filled.
pub const RECV_WAITALL: u16 = 2;
/// `sdflags`
pub const SHUT_RD: u8 = 1;
/// `sdflags`
pub const SHUT_WR: u8 = 2;

/// `fstflags`
#[allow(missing_docs)]
pub mod fstflags {
    pub const ATIM: u16 = 1;
    pub const ATIM_NOW: u16 = 2;
    pub const MTIM: u16 = 4;
    pub const MTIM_NOW: u16 = 8;
}

/// `whence`
#[allow(missing_docs)]
pub mod whence {
    pub const SET: u8 = 0;
    pub const CUR: u8 = 1;
    pub const END: u8 = 2;
}

/// `prestat` tag of a preopened directory.
pub const PREOPENTYPE_DIR: u8 = 0;
/// `prestat` tag the host returns for open fds that are not preopened
/// directories (listeners at fd 3 and up). preview1 defines only the
/// directory tag, and wasi-libc's preopen scan stops at the first EBADF and
/// aborts on any other error, so a listener must answer "success, not a
/// directory" for the directories numbered after it to be found.
pub const PREOPENTYPE_OTHER: u8 = 1;

/// Sizes and field offsets of the structs exchanged through guest memory.
pub mod layout {
    /// `iovec` / `ciovec`: buf (u32), buf_len (u32).
    pub const IOVEC_SIZE: u32 = 8;
    /// `fdstat`: filetype u8 @0, flags u16 @2, rights_base u64 @8, rights_inheriting u64 @16.
    pub const FDSTAT_SIZE: usize = 24;
    /// `filestat`: dev @0, ino @8, filetype u8 @16, nlink @24, size @32, atim @40, mtim @48, ctim @56.
    pub const FILESTAT_SIZE: usize = 64;
    /// `prestat`: tag u8 @0, name_len u32 @4.
    pub const PRESTAT_SIZE: usize = 8;
    /// `dirent` header: d_next u64 @0, d_ino u64 @8, d_namlen u32 @16, d_type u8 @20.
    pub const DIRENT_SIZE: usize = 24;
    /// `subscription`: userdata u64 @0, tag u8 @8, union @16.
    pub const SUBSCRIPTION_SIZE: u32 = 48;
    /// `event`: userdata u64 @0, error u16 @8, type u8 @10, nbytes u64 @16, flags u16 @24.
    pub const EVENT_SIZE: u32 = 32;
}
