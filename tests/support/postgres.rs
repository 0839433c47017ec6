//! A PostgreSQL server of a test's own, for tests that stop and restart it
//! (the shared one, started by scripts/test, must stay up for the others).
//! As root, the server runs as the `postgres` user, which PostgreSQL requires.

use std::path::PathBuf;
use std::process::Command;

pub struct Postgres {
    pub port: u16,
    data: PathBuf,
    _dir: tempfile::TempDir,
    running: bool,
}

fn as_postgres(program: &str) -> Command {
    let bin = [
        "/usr/lib/postgresql/15/bin",
        "/usr/lib/postgresql/16/bin",
        "/usr/lib/postgresql/17/bin",
    ]
    .iter()
    .map(|d| PathBuf::from(d).join(program))
    .find(|p| p.exists())
    .unwrap_or_else(|| PathBuf::from(program));
    if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(bin);
        cmd
    } else {
        Command::new(bin)
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn check(mut cmd: Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Postgres {
    /// Creates a cluster (trust authentication, loopback only) and starts it.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new().prefix("tx-pg").tempdir().unwrap();
        let data = dir.path().join("data");
        // The server refuses to run as root and needs to own its folder.
        if is_root() {
            check(
                {
                    let mut c = Command::new("chown");
                    c.args(["-R", "postgres:postgres"]).arg(dir.path());
                    c
                },
                "chown",
            );
        }
        let mut init = as_postgres("initdb");
        init.args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data);
        check(init, "initdb");
        let port = super::emulator::free_port();
        let mut pg = Self {
            port,
            data,
            _dir: dir,
            running: false,
        };
        pg.start_again();
        pg
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn start_again(&mut self) {
        let mut start = as_postgres("pg_ctl");
        start
            .args(["start", "-w", "-t", "60", "-D"])
            .arg(&self.data)
            .arg("-o")
            .arg(format!(
                "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off",
                self.port,
                self.data.display()
            ))
            .arg("-l")
            .arg(self.data.join("log"));
        check(start, "pg_ctl start");
        self.running = true;
    }

    pub fn stop(&mut self) {
        if self.running {
            let mut stop = as_postgres("pg_ctl");
            stop.args(["stop", "-w", "-m", "fast", "-D"]).arg(&self.data);
            check(stop, "pg_ctl stop");
            self.running = false;
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.running {
            let mut stop = as_postgres("pg_ctl");
            stop.args(["stop", "-m", "immediate", "-D"]).arg(&self.data);
            let _ = stop.output();
        }
    }
}
