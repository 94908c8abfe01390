//! The harness binary's own settings, checked on the real process.

use std::io::BufRead;
use std::process::{Command, Stdio};

/// Runtime worker threads of a running process (tokio names them
/// `tokio-rt-worker`; older versions `tokio-runtime-worker`, which the
/// kernel cuts to 15 bytes).
fn runtime_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the process's threads")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| matches!(name.trim_end(), "tokio-rt-worker" | "tokio-runtime-w"))
        .count()
}

#[test]
fn threads_sets_the_mock_runtime_size() {
    for threads in [1usize, 3] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sluice-load"))
            .args(["mock", "--listen", "127.0.0.1:0", "--threads"])
            .arg(threads.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the mock");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("the mock's first line");
        assert!(line.starts_with("mock listening on 127.0.0.1:"), "{line}");
        // The runtime's threads start just after the line is printed: wait
        // for the asked number, then a moment more for any extra one.
        let pid = child.id();
        for _ in 0..100 {
            if runtime_threads(pid) >= threads {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
        let seen = runtime_threads(pid);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(seen, threads, "--threads {threads}");
    }
}
