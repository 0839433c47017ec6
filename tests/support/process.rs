//! Driving the real binary as a server: its output lines, its addresses,
//! signals, and its exit.

use std::io::{BufRead as _, BufReader};
use std::process::Child;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Lines a child writes, delivered as they come.
pub fn lines(stream: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits (at most 20 s) for a line containing `needle`.
pub fn wait_for(rx: &mpsc::Receiver<String>, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return line,
            Ok(_) => {}
            Err(e) => panic!("no line with {needle:?}: {e}"),
        }
    }
}

/// The API and metrics addresses, from the server's "listening" line.
pub fn listening_addrs(stderr: &mpsc::Receiver<String>) -> (String, String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = stderr.recv_timeout(left).expect("the server logs where it listens");
        if let Some(addrs) = super::parse_listening(&line) {
            return addrs;
        }
    }
}

/// The JSON fields of the server's start-up ("listening") line; panics
/// with every line before it if none comes within 20 s (a binary that
/// cannot start says why there).
pub fn startup_fields(stderr: &mpsc::Receiver<String>) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = stderr.recv_timeout(left) else {
            panic!("no start-up line; the binary said:\n{}", seen.join("\n"));
        };
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
            && v["fields"]["message"] == "listening"
        {
            return v["fields"].clone();
        }
        seen.push(line);
    }
}

/// The API address, from the server's "listening" line.
pub fn listening_addr(stderr: &mpsc::Receiver<String>) -> String {
    listening_addrs(stderr).0
}

/// Starts a `serve` command with its log piped; returns the process, its
/// API address and its log lines.
pub fn start_server(cmd: &mut std::process::Command) -> (Child, String, mpsc::Receiver<String>) {
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the server");
    let stderr = lines(child.stderr.take().unwrap());
    let addr = listening_addr(&stderr);
    (child, addr, stderr)
}

pub fn signal(child: &Child, name: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits (at most 40 s, beyond the 30 s grace) for the child to exit.
pub fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    for _ in 0..400 {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().unwrap();
    panic!("the server did not exit");
}
