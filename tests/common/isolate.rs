//! Running a test in a child process with a memory cap and a time limit, to prove that a case
//! neither hangs nor allocates much, and prints no panic trace.
//!
//! The test binary re-executes itself with the test's exact name as its filter, and an
//! environment variable that tells the child to run the body instead of spawning again. The
//! child caps its own data segment (`RLIMIT_DATA`: heap and private writable mappings, which is
//! where libtorch's and Rust's allocations go) before the body runs, so any allocation beyond
//! [`MEMORY_CAP`] fails inside the child; the parent kills a child that runs past
//! [`TIME_LIMIT`], and fails the test if the child failed, timed out, or printed "panicked at"
//! (the panic hook's line: an error that is returned must not print a panic trace).
//!
//! ```ignore
//! isolated! {
//!     fn fifo_is_refused() {
//!         /* runs in the child */
//!     }
//! }
//! ```
#![allow(dead_code)]

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Data-segment cap of a child: far below anything a hostile config asks for (terabytes), far
/// above what a case needs (tiny fixtures; a child peaks at ~0.2 GB, mostly libtorch).
pub const MEMORY_CAP: u64 = 1 << 30;
/// Wall-clock limit of a child: a hang is reported after this long. A case takes ~1 s.
pub const TIME_LIMIT: Duration = Duration::from_secs(90);

const CHILD_ENV: &str = "NNSIGHT_ISOLATED_TEST";

/// A `#[test]` whose body runs through [`run`] (`#[macro_use] mod common;` to use it).
#[allow(unused_macros)]
macro_rules! isolated {
    ($($(#[$m:meta])* fn $name:ident() $body:block)*) => {$(
        $(#[$m])*
        #[test]
        fn $name() {
            $crate::common::isolate::run(stringify!($name), || $body)
        }
    )*};
}

/// In the test process: runs the test `name` of this binary in a child process and checks how
/// it went (module docs). In the child: caps memory and runs `body`.
pub fn run(name: &str, body: impl FnOnce()) {
    run_for(name, TIME_LIMIT, body)
}

/// [`run`] with another time limit.
pub fn run_for(name: &str, time_limit: Duration, body: impl FnOnce()) {
    if std::env::var(CHILD_ENV).as_deref() == Ok(name) {
        cap_memory(MEMORY_CAP);
        body();
        eprintln!("{name}: peak resident memory {} MB", peak_rss_kb() / 1024);
        return;
    }
    let exe = std::env::current_exe().expect("test binary path");
    let start = Instant::now();
    let mut child = Command::new(exe)
        .args([name, "--exact", "--include-ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, name)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the test binary again");
    let read = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = read(Box::new(child.stdout.take().unwrap()));
    let err = read(Box::new(child.stderr.take().unwrap()));
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the child") {
            break Some(status);
        }
        if start.elapsed() > time_limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (stdout, stderr) = (out.join().unwrap(), err.join().unwrap());
    let took = start.elapsed();
    let report = format!("--- child stdout:\n{stdout}\n--- child stderr:\n{stderr}");
    let Some(status) = status else {
        panic!("`{name}` did not finish within {time_limit:?}: a hang\n{report}");
    };
    assert!(status.success(), "`{name}` failed in its child process ({status}) under a {} MB data cap\n{report}", MEMORY_CAP >> 20);
    assert!(stdout.contains(&format!("test {name} ... ok")), "`{name}` did not run in the child\n{report}");
    assert!(!stderr.contains("panicked at"), "`{name}` printed a panic trace\n{report}");
    // The child's own report lines (`name: ...`), then the time.
    for line in stderr.lines().filter(|l| l.starts_with(&format!("{name}: "))) {
        eprintln!("{line}");
    }
    eprintln!("{name}: {:.2} s in its own process", took.as_secs_f64());
}

fn cap_memory(bytes: u64) {
    let limit = libc::rlimit { rlim_cur: bytes as libc::rlim_t, rlim_max: bytes as libc::rlim_t };
    // SAFETY: setrlimit reads the struct; it only lowers this process's own limit.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_DATA, &limit) };
    assert_eq!(rc, 0, "setrlimit(RLIMIT_DATA): {}", std::io::Error::last_os_error());
}

/// `VmHWM` of `/proc/self/status`, in KB (0 where there is no procfs).
fn peak_rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
