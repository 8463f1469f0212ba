// Package faultfs is a FUSE filesystem for durability tests: a loopback
// over real files that remembers what has not been made durable yet, so that
// a test can cut the power, or make the disk fail, under Cairn's storage and
// then look at exactly what a disk would hold. It follows LazyFS (from the
// Jepsen project) in spirit and is written with go-fuse.
//
// # Its part in the system
//
// A chunkserver keeps everything it must not lose in its data directory:
// the shared write-ahead log (copyset/wal), chunk files taken from the chunk
// file pool (chunkfilepool), the pool's own formatted files and state, and
// small metadata files written with fsutil.WriteFileAtomic. Their
// correctness rests on fsync: what was acknowledged was fsynced first. The
// only honest way to test that is to lose, at a crash, everything that was
// not fsynced, and nothing else. faultfs is that seam. It is mounted over a
// chunkserver's data directory:
//
//   - in-process, by Go tests that open Cairn's storage (a WAL on a chunk
//     file pool, a datastore) inside the mount, crash it and reopen it;
//   - by the multi-process fault-injection harness, which mounts one faultfs
//     per chunkserver data directory in the test process, runs chunkserver
//     processes on the mounts, kills them with SIGKILL and then calls Crash.
//
// The fault injection is driven only through this package's Go API, from
// the process that mounted the filesystem.
//
// # What passes through
//
// Every operation goes to the backing directory at once: open, create,
// read, write, pread/pwrite at any offset, fallocate (plain, keep-size,
// punch-hole, zero-range; modes that move data are refused), ftruncate and
// truncate, stat and statx, rename including renameat2's RENAME_NOREPLACE
// and RENAME_EXCHANGE, unlink, mkdir, rmdir, readdir, symlink, link,
// xattrs, statfs, and fsync/fdatasync of files and directories (real
// syncs of the backing files; directory syncs are counted in
// Stats.DirSyncs). O_TMPFILE, copy_file_range (the kernel falls
// back to reads and writes) and ioctls are refused; O_DIRECT is accepted and
// dropped for the backing file.
//
// The kernel caches nothing: files are opened in direct-IO mode, attribute,
// entry and negative-entry timeouts are zero, and FUSE passthrough and the
// writeback cache are off. So every read and write of a process reaches this
// server synchronously, in the order the process issued it; a shared mmap
// of a file is refused with ENODEV (Cairn does not use mmap).
//
// flock(2) is served by the kernel itself: the filesystem does not ask for
// lock requests, so the kernel keeps flock and POSIX locks on its own inodes
// of the mount. They exclude each other across all processes that use the
// same mount, which is what Cairn's directory locks (chunkfilepool.Open,
// datastore.Open) need; a lock dies with its descriptor, so a killed
// process's locks are gone before Crash. Locks taken through the mount do
// not exclude users of the backing directory.
//
// # Durability model
//
// Writes go to the backing file at once and reads see them. For every file
// the layer keeps, from the first change after the file's last successful
// fsync or fdatasync, the file's size at that sync and the pre-image (the
// content at that sync) of every 4 KiB page changed since, by writes,
// truncates or fallocate. Pages past the size at the sync need no
// pre-image. The state is per inode, so it follows renames; a file that
// loses its last name is forgotten (nothing can bring it back).
//
//   - fsync or fdatasync of a file: the real fsync/fdatasync of the backing
//     file, then the pre-images are forgotten: the data is durable. The
//     layer makes no difference between the two (fdatasync makes the size
//     durable too).
//   - A file opened O_SYNC or O_DSYNC is synced after every write; that
//     sync covers the file's other unsynced pages as well.
//   - Crash (a power cut) puts every file with unsynced changes back to its
//     pre-images and synced size: the backing directory then holds what a
//     disk would after a power loss in which all unsynced data is lost.
//     With CrashOptions.Keep between 0 and 1 each unsynced page (and each
//     changed size) survives with that probability instead, decided by
//     CrashOptions.Seed: partial writeback, in which a write across pages
//     may be torn but every page is wholly old or wholly new (a page past
//     the synced size is old when it is zeros).
//   - Metadata operations (create, rename, unlink, mkdir, rmdir, link) are
//     durable as soon as they return: a crash keeps them. Cairn fsyncs the
//     directory after each of them, so this errs on the side that keeps
//     data (a file created and fsynced is never lost because its directory
//     entry was), and a test of data loss stays exact.
//
// While crashed, until Restart, every request through the mount fails with
// EIO, except closing files. Crash first waits for the requests in flight,
// so no request that started before the cut (for instance from a process
// killed while blocked in a write) changes a file after it. Descriptors
// opened before a crash keep failing after Restart (only fstat still
// works), like the processes that held them: an in-process test closes what
// it had open (ignoring the errors) and opens it again.
//
// Crash is called by the test once it has killed the processes, so the cut
// falls wherever they were. CrashAtSync instead arms a cut at the nth
// fsync of a matching file: that fsync does not happen, and the power is
// cut at that instant, exactly between the writes it would have made
// durable and their sync (with processes still running, which see EIO from
// then on; WaitCrash tells when the cut is done). A cut by Crash tends to
// land after the syncs in flight, since it waits for them; CrashAtSync is
// how a test makes sure a crash catches unsynced data.
//
// # Failing disk
//
// Rules, each removable, make operations on files whose path (relative to
// the mount root, slash-separated) matches a regular expression fail:
//
//   - FailSync: the next N fsync/fdatasync calls fail with EIO, and each
//     failed call loses the file's unsynced data (puts back its pre-images
//     and synced size) and forgets it, so that a retried fsync on the same
//     descriptor succeeds although the data is gone. This is Linux's
//     writeback-error behaviour (the error is reported once, and the dirty
//     pages are not written again): code that retries fsync after an error
//     and then acknowledges loses data, and a test can show it.
//   - FailWrites: writes and fallocates fail with EIO or ENOSPC and write
//     nothing.
//   - FailReads: reads fail with EIO.
//
// Stats counts syncs, writes, faults injected, pages lost by crashes and by
// failed syncs, and the unsynced data held, so a test can assert that a
// fault actually fired.
//
// # Memory
//
// The pre-images are the only memory the layer holds per byte of data: at
// most one page per page written since the file's last sync and below the
// size at that sync, so the memory is bounded by the unsynced data the
// users hold (appends past the end of a file cost nothing). It is capped by
// Options.MaxUnsyncedBytes (default 256 MiB): a write that finds the cap
// reached waits until a sync anywhere frees pre-images, for at most
// Options.UnsyncedWait (default 30 s); then it fails with EIO, the failure
// is logged at error level and counted in Stats.LimitFailures. A test that
// writes more than the cap without syncing therefore fails loudly instead
// of hanging or growing without bound.
//
// # Mounting
//
// Mount mounts a faultfs over a backing directory; as root it calls
// mount(2) directly, without fusermount. Unmount unmounts it, and detaches
// it lazily when something still holds a file in it so that no mount is left
// behind. MountForTest mounts one under t.TempDir() and unmounts it when the
// test ends. Tests that need FUSE call RequireFUSE (MountForTest does): it
// skips when /dev/fuse or root is missing, except when the environment
// variable CI is set, where it fails instead.
//
// The process that serves a mount usually uses it too, and if it died while
// one of its own threads waited on the mount, that thread would wait for
// ever and the process would never end. Each mount therefore has a watchdog,
// a small shell child that aborts the FUSE connection (through fusectl,
// which Mount mounts at /sys/fs/fuse/connections if needed) when it sees
// the process dying in that state, and detaches the mount once the process
// is gone: a test binary that panics or times out leaves neither a hung
// process nor a dead mount behind.
package faultfs
