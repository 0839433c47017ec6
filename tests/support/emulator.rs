//! A Datastore emulator of a test's own, for tests that stop and restart it
//! (the shared one, started by scripts/test, must stay up for the others).

use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Emulator {
    pub port: u16,
    child: Option<Child>,
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Emulator {
    /// Starts an emulator on `port` and waits (at most 90 s) until it answers.
    pub async fn start(port: u16) -> Self {
        let child = Command::new("gcloud")
            .args([
                "beta",
                "emulators",
                "datastore",
                "start",
                "--no-store-on-disk",
                "--consistency=1.0",
            ])
            .arg(format!("--host-port=127.0.0.1:{port}"))
            .arg(format!("--project={}", super::TEST_PROJECT))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group: gcloud starts a JVM child, and stopping
            // the group stops both.
            .process_group(0)
            .spawn()
            .expect("start gcloud (the Datastore emulator)");
        let emulator = Self {
            port,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(90);
        let client = reqwest::Client::new();
        loop {
            let ok = match client.get(format!("http://127.0.0.1:{port}/")).send().await {
                Ok(r) => r.text().await.map(|t| t.contains("Ok")).unwrap_or(false),
                Err(_) => false,
            };
            if ok {
                return emulator;
            }
            assert!(Instant::now() < deadline, "the emulator did not start within 90 s");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Stops the emulator and everything it started, and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let group = format!("-{}", child.id());
            let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
            for _ in 0..100 {
                if child.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
            let _ = child.wait();
            // Wait until the port is really closed.
            for _ in 0..100 {
                if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.stop();
    }
}
