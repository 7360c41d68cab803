//! What the operating system is asked directly, for Unix (Linux, macOS) and Windows: positional
//! reads, free space, whether a process runs, a full disk, and this process's CPU time and faults.
//! Linux-only speed-ups (copy_file_range, writeback hints, page population) stay beside their use,
//! each with its portable fallback.

use std::fs::File;
use std::io;
use std::path::Path;

/// Read exactly `buf.len()` bytes at offset `at`, leaving any file position to other readers
/// (on Windows `seek_read` moves the handle's position, which bone-tool never reads by).
pub fn read_exact_at(file: &File, buf: &mut [u8], at: u64) -> io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::read_exact_at(file, buf, at)
    }
    #[cfg(windows)]
    {
        use std::os::windows::fs::FileExt;
        let (mut buf, mut at) = (buf, at);
        while !buf.is_empty() {
            match file.seek_read(buf, at) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "failed to fill whole buffer")),
                Ok(n) => {
                    buf = &mut buf[n..];
                    at += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Bytes available to this user on the filesystem holding `dir`; None where the system will not
/// say.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
        // SAFETY: a valid NUL-terminated path and a zeroed statvfs struct to fill.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return None;
        }
        #[allow(clippy::unnecessary_cast)] // u32 on macOS, u64 on Linux
        Some(st.f_bavail as u64 * st.f_frsize as u64)
    }
    #[cfg(windows)]
    {
        use std::os::windows::ffi::OsStrExt;
        let wide: Vec<u16> = dir.as_os_str().encode_wide().chain(Some(0)).collect();
        let mut avail = 0u64;
        // SAFETY: a NUL-terminated UTF-16 path; the two totals not asked for are null.
        let ok = unsafe {
            windows_sys::Win32::Storage::FileSystem::GetDiskFreeSpaceExW(
                wide.as_ptr(),
                &mut avail,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        };
        (ok != 0).then_some(avail)
    }
}

/// Whether a process with this id runs. Unix: signal 0 checks without sending, and EPERM means it
/// runs as another user (Linux's /proc is not there on macOS). Windows: a process that can be
/// opened and has no exit code yet, or that this user may not open.
pub fn process_exists(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
        // SAFETY: kill with signal 0 sends nothing; it only checks that the process exists.
        let sent = unsafe { libc::kill(pid, 0) };
        sent == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(windows)]
    {
        use windows_sys::Win32::Foundation::{CloseHandle, ERROR_ACCESS_DENIED, STILL_ACTIVE};
        use windows_sys::Win32::System::Threading::{
            GetExitCodeProcess, OpenProcess, PROCESS_QUERY_LIMITED_INFORMATION,
        };
        // SAFETY: OpenProcess returns null or a handle that is closed below.
        let handle = unsafe { OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, 0, pid) };
        if handle.is_null() {
            return io::Error::last_os_error().raw_os_error() == Some(ERROR_ACCESS_DENIED as i32);
        }
        let mut code = 0u32;
        // SAFETY: a valid process handle and a u32 to fill.
        let asked = unsafe { GetExitCodeProcess(handle, &mut code) };
        unsafe { CloseHandle(handle) };
        // an exited process keeps a handle while anyone holds one, with its exit code
        asked == 0 || code == STILL_ACTIVE as u32
    }
}

/// Whether a write failed because the disk is full.
pub fn disk_full(e: &io::Error) -> bool {
    #[cfg(unix)]
    {
        e.raw_os_error() == Some(libc::ENOSPC)
    }
    #[cfg(windows)]
    {
        use windows_sys::Win32::Foundation::{ERROR_DISK_FULL, ERROR_HANDLE_DISK_FULL};
        matches!(e.raw_os_error(), Some(c) if c == ERROR_DISK_FULL as i32 || c == ERROR_HANDLE_DISK_FULL as i32)
    }
}

/// `getrusage(RUSAGE_SELF)`: CPU seconds in user and in system mode, page faults, context switches.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ProcessUsage {
    pub user: f64,
    pub system: f64,
    pub minor_faults: i64,
    pub major_faults: i64,
    pub voluntary_switches: i64,
    pub involuntary_switches: i64,
}

impl ProcessUsage {
    /// This process's usage so far; None where the system will not say (Windows, which keeps no
    /// such counts by the same definitions).
    pub fn now() -> Option<ProcessUsage> {
        #[cfg(unix)]
        {
            // SAFETY: getrusage writes a whole rusage into the zeroed value given.
            let mut u: libc::rusage = unsafe { std::mem::zeroed() };
            if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
                return None;
            }
            let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
            Some(ProcessUsage {
                user: secs(u.ru_utime),
                system: secs(u.ru_stime),
                minor_faults: u.ru_minflt as i64,
                major_faults: u.ru_majflt as i64,
                voluntary_switches: u.ru_nvcsw as i64,
                involuntary_switches: u.ru_nivcsw as i64,
            })
        }
        #[cfg(windows)]
        {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_process_exists_and_a_reaped_one_does_not() {
        assert!(process_exists(std::process::id()));
        #[cfg(unix)]
        assert!(process_exists(1), "init runs, as another user or not");
        // a program that exits at once on either system
        let mut child = std::process::Command::new(std::env::current_exe().unwrap()).arg("--list").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!process_exists(pid), "reaped");
    }

    #[test]
    fn reads_at_offsets_and_says_when_the_file_ends_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, (0u8..=255).collect::<Vec<u8>>()).unwrap();
        let f = File::open(&path).unwrap();
        let mut buf = [0u8; 4];
        read_exact_at(&f, &mut buf, 10).unwrap();
        assert_eq!(buf, [10, 11, 12, 13]);
        read_exact_at(&f, &mut buf, 252).unwrap();
        assert_eq!(buf, [252, 253, 254, 255]);
        let e = read_exact_at(&f, &mut buf, 253).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(free_bytes(dir.path()).is_some_and(|b| b > 0));
    }
}
