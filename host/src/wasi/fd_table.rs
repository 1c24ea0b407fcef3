//! A process's file descriptor table: what each guest fd refers to.
//!
//! Open objects are reference-counted (`Arc`) so that a future fork or dup
//! shares them the way POSIX does (a prefork server's workers share one
//! listener). The threads of a process share one table
//! ([`SharedFdTable`]); its lock is held only to look up or change a slot,
//! never across a call that waits, so a thread blocked reading a socket
//! does not stop another from opening a file. Each entry also keeps what a snapshot needs to describe it
//! (guest path, listener address), not only the host handle.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, OnceLock};

use super::abi::{fdflags, filetype, Errno};

/// Where a standard stream of the guest goes.
#[derive(Debug)]
pub enum Stdio {
    /// The host process's own stdin, stdout or stderr.
    Inherit,
    /// A descriptor the embedder supplies (a pipe, a file).
    Fd(OwnedFd),
}

/// A standard stream as installed in the table.
#[derive(Debug)]
pub struct StdStream {
    /// 0, 1 or 2: which host stream `Stdio::Inherit` stands for.
    pub index: u8,
    /// Where it goes.
    pub target: Stdio,
}

impl StdStream {
    /// The host descriptor behind this stream.
    pub fn host_fd(&self) -> BorrowedFd<'_> {
        match &self.target {
            Stdio::Fd(fd) => fd.as_fd(),
            // SAFETY-free: rustix hands out the process's standard fds with a
            // 'static lifetime; the host never closes them.
            Stdio::Inherit => match self.index {
                0 => rustix::stdio::stdin(),
                1 => rustix::stdio::stdout(),
                _ => rustix::stdio::stderr(),
            },
        }
    }
}

/// A regular file opened through a preopened directory.
#[derive(Debug)]
pub struct OpenFile {
    /// The host file (cap-std opened it inside the sandbox).
    pub file: std::fs::File,
    /// The path the guest opened, relative to `dir_fd`'s directory.
    pub guest_path: String,
    /// Opened for reading.
    pub readable: bool,
    /// Opened for writing.
    pub writable: bool,
}

/// A named pipe (FIFO) or character device opened by path: a stream with
/// no offset. Its host descriptor is always non-blocking, so a guest fd in
/// blocking mode waits where the host can interrupt it, never in the
/// kernel. Opening one never waits: a FIFO opened for reading before any
/// writer has it open waits for one at its first read, and one opened for
/// writing before any reader does at its first write (see [`PendingWriter`]).
#[derive(Debug)]
pub struct OpenPipe {
    /// The host descriptor, in non-blocking mode; for a writer opened
    /// before any reader, the FIFO opened as a location only (`O_PATH`),
    /// which `fstat` can describe until the writer connects.
    pub file: std::fs::File,
    /// For a writer opened before any reader: how it connects.
    pub pending: Option<PendingWriter>,
    /// The path the guest opened, relative to `dir_fd`'s directory.
    pub guest_path: String,
    /// Opened for reading.
    pub readable: bool,
    /// Opened for writing.
    pub writable: bool,
    /// A FIFO, whose reads find no data but no end of stream either until
    /// a writer has come and gone; else a character device.
    pub fifo: bool,
    /// Opened in blocking mode, so that in POSIX the open would have waited
    /// for the other end: a FIFO reader's first reads wait for a writer.
    pub opened_blocking: bool,
}

impl OpenPipe {
    /// The descriptor reads and writes use: `None` while a writer waits
    /// for its first reader.
    pub fn io(&self) -> Option<&std::fs::File> {
        match &self.pending {
            None => Some(&self.file),
            Some(p) => p.connected.get(),
        }
    }

    /// The descriptor `fstat` describes the pipe by.
    pub fn described(&self) -> &std::fs::File {
        self.io().unwrap_or(&self.file)
    }
}

/// Where a FIFO opened for writing with no reader is: `open(2)` refuses a
/// non-blocking writer then (ENXIO), so the host tries again when the guest
/// first writes or polls, through the same sandboxed directory.
#[derive(Debug)]
pub struct PendingWriter {
    /// The directory the path was resolved in.
    pub dir: cap_std::fs::Dir,
    /// The path, relative to `dir`.
    pub path: String,
    /// Whether a final symlink is followed.
    pub follow: cap_fs_ext::FollowSymlinks,
    /// The host descriptor (non-blocking), once a reader has come.
    pub connected: OnceLock<std::fs::File>,
}

/// A directory: a preopen or one the guest opened below it.
#[derive(Debug)]
pub struct OpenDir {
    /// The sandboxed host directory.
    pub dir: cap_std::fs::Dir,
    /// For a preopen, the name the guest sees it under (`--dir HOST::GUEST`).
    pub preopen_name: Option<String>,
    /// For a preopen, the host directory, so a snapshot can reopen it.
    pub host_path: Option<std::path::PathBuf>,
    /// The path the guest opened, relative to its parent fd (empty for a preopen).
    pub guest_path: String,
    /// The entries as listed at cookie 0, so later cookies index a stable list.
    pub listing: Mutex<Vec<super::fs::DirListing>>,
}

/// A preopened TCP listener.
#[derive(Debug)]
pub struct Listener {
    /// The host socket, always non-blocking: blocking is done in `wait`.
    pub socket: TcpListener,
    /// The address it is bound to.
    pub addr: SocketAddr,
}

/// A connected TCP stream accepted by the guest.
#[derive(Debug)]
pub struct Stream {
    /// The host socket, always non-blocking: blocking is done in `wait`.
    pub socket: TcpStream,
}

/// What a guest fd refers to.
#[derive(Debug, Clone)]
pub enum Object {
    /// stdin, stdout or stderr.
    Std(Arc<StdStream>),
    /// A regular file.
    File(Arc<OpenFile>),
    /// A named pipe or character device.
    Pipe(Arc<OpenPipe>),
    /// A directory.
    Dir(Arc<OpenDir>),
    /// A listening socket.
    Listener(Arc<Listener>),
    /// A connected socket.
    Stream(Arc<Stream>),
}

impl Object {
    /// Which open object this is: equal for two fds (of one process or of
    /// several) that share it, as a forked child's fds share its parent's.
    pub fn identity(&self) -> usize {
        match self {
            Object::Std(s) => Arc::as_ptr(s) as usize,
            Object::File(f) => Arc::as_ptr(f) as usize,
            Object::Pipe(p) => Arc::as_ptr(p) as usize,
            Object::Dir(d) => Arc::as_ptr(d) as usize,
            Object::Listener(l) => Arc::as_ptr(l) as usize,
            Object::Stream(s) => Arc::as_ptr(s) as usize,
        }
    }

    /// The preview1 file type the guest sees.
    pub fn filetype(&self) -> u8 {
        match self {
            Object::Std(s) => {
                if rustix::termios::isatty(s.host_fd()) {
                    filetype::CHARACTER_DEVICE
                } else {
                    match rustix::fs::fstat(s.host_fd()) {
                        Ok(st) => host_mode_filetype(st.st_mode),
                        Err(_) => filetype::UNKNOWN,
                    }
                }
            }
            Object::File(_) => filetype::REGULAR_FILE,
            // preview1 has no type for a FIFO.
            Object::Pipe(p) if p.fifo => filetype::UNKNOWN,
            Object::Pipe(_) => filetype::CHARACTER_DEVICE,
            Object::Dir(_) => filetype::DIRECTORY,
            Object::Listener(_) | Object::Stream(_) => filetype::SOCKET_STREAM,
        }
    }
}

/// Maps a host `st_mode` to a preview1 file type.
pub fn host_mode_filetype(mode: u32) -> u8 {
    match rustix::fs::FileType::from_raw_mode(mode) {
        rustix::fs::FileType::RegularFile => filetype::REGULAR_FILE,
        rustix::fs::FileType::Directory => filetype::DIRECTORY,
        rustix::fs::FileType::Symlink => filetype::SYMBOLIC_LINK,
        rustix::fs::FileType::CharacterDevice => filetype::CHARACTER_DEVICE,
        rustix::fs::FileType::BlockDevice => filetype::BLOCK_DEVICE,
        rustix::fs::FileType::Socket => filetype::SOCKET_STREAM,
        _ => filetype::UNKNOWN,
    }
}

/// One slot of the table.
#[derive(Debug, Clone)]
pub struct Descriptor {
    /// The open object.
    pub object: Object,
    /// `fdflags` set on this fd (only NONBLOCK and APPEND change behaviour).
    pub flags: u16,
}

impl Descriptor {
    /// Whether calls on this fd return EAGAIN instead of blocking.
    pub fn nonblocking(&self) -> bool {
        self.flags & fdflags::NONBLOCK != 0
    }
}

/// The table itself: guest fd number -> descriptor.
#[derive(Debug, Default)]
pub struct FdTable {
    slots: Vec<Option<Descriptor>>,
}

/// The most fds one process may hold, so a leaking guest gets EMFILE rather
/// than exhausting the host.
const MAX_FDS: usize = 16 * 1024;

impl FdTable {
    /// Looks up an fd.
    pub fn get(&self, fd: u32) -> Result<&Descriptor, Errno> {
        self.slots
            .get(fd as usize)
            .and_then(Option::as_ref)
            .ok_or(Errno::BADF)
    }

    /// Looks up an fd for changing its flags.
    pub fn get_mut(&mut self, fd: u32) -> Result<&mut Descriptor, Errno> {
        self.slots
            .get_mut(fd as usize)
            .and_then(Option::as_mut)
            .ok_or(Errno::BADF)
    }

    /// Installs an object at the lowest free fd, as POSIX does.
    pub fn insert(&mut self, object: Object, flags: u16) -> Result<u32, Errno> {
        let desc = Descriptor { object, flags };
        if let Some(i) = self.slots.iter().position(Option::is_none) {
            self.slots[i] = Some(desc);
            return Ok(i as u32);
        }
        if self.slots.len() >= MAX_FDS {
            return Err(Errno::MFILE);
        }
        self.slots.push(Some(desc));
        Ok(self.slots.len() as u32 - 1)
    }

    /// Removes an fd, returning what it held.
    pub fn remove(&mut self, fd: u32) -> Result<Descriptor, Errno> {
        self.slots
            .get_mut(fd as usize)
            .and_then(Option::take)
            .ok_or(Errno::BADF)
    }

    /// Moves `from` onto `to`, closing what `to` held.
    pub fn renumber(&mut self, from: u32, to: u32) -> Result<(), Errno> {
        self.get(to)?;
        let desc = self.remove(from)?;
        self.slots[to as usize] = Some(desc);
        Ok(())
    }

    /// Installs an object at exactly `fd`, replacing what was there (for
    /// rebuilding a table from a snapshot).
    pub fn place(&mut self, fd: u32, object: Object, flags: u16) -> Result<(), Errno> {
        let i = fd as usize;
        if i >= MAX_FDS {
            return Err(Errno::MFILE);
        }
        if self.slots.len() <= i {
            self.slots.resize_with(i + 1, || None);
        }
        self.slots[i] = Some(Descriptor { object, flags });
        Ok(())
    }

    /// Every open fd, in order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &Descriptor)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, d)| d.as_ref().map(|d| (i as u32, d)))
    }
}

/// The fd table of a process, shared by its threads. Lookups hand out a
/// clone of the slot (its objects are `Arc`s), so no caller keeps the lock.
#[derive(Debug, Clone, Default)]
pub struct SharedFdTable {
    table: Arc<Mutex<FdTable>>,
}

impl SharedFdTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, FdTable> {
        // A panic while holding the lock cannot leave a slot half written
        // (every change is one assignment), so a poisoned table is usable.
        self.table.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Looks up an fd.
    pub fn get(&self, fd: u32) -> Result<Descriptor, Errno> {
        self.lock().get(fd).cloned()
    }

    /// Sets the `fdflags` of an fd.
    pub fn set_flags(&self, fd: u32, flags: u16) -> Result<(), Errno> {
        self.lock().get_mut(fd)?.flags = flags;
        Ok(())
    }

    /// Installs an object at the lowest free fd.
    pub fn insert(&self, object: Object, flags: u16) -> Result<u32, Errno> {
        self.lock().insert(object, flags)
    }

    /// Removes an fd, returning what it held.
    pub fn remove(&self, fd: u32) -> Result<Descriptor, Errno> {
        self.lock().remove(fd)
    }

    /// Moves `from` onto `to`, closing what `to` held.
    pub fn renumber(&self, from: u32, to: u32) -> Result<(), Errno> {
        self.lock().renumber(from, to)
    }

    /// Installs an object at exactly `fd`.
    pub fn place(&self, fd: u32, object: Object, flags: u16) -> Result<(), Errno> {
        self.lock().place(fd, object, flags)
    }

    /// Every open fd, in order, as it is now.
    pub fn entries(&self) -> Vec<(u32, Descriptor)> {
        self.lock().iter().map(|(fd, d)| (fd, d.clone())).collect()
    }

    /// A table of its own for a forked process: the same fds, sharing the
    /// open objects, as POSIX's `fork` duplicates descriptors.
    pub fn fork(&self) -> SharedFdTable {
        let slots = self.lock().slots.clone();
        SharedFdTable { table: Arc::new(Mutex::new(FdTable { slots })) }
    }
}
