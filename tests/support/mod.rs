//! What the end-to-end tests of the binary share: running `stele`, waiting for its start-up line,
//! stopping it, and a PostgreSQL server of a test's own (to restart under load).

#![allow(dead_code)]

pub mod mail;
pub mod telegram;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The key-encryption key the tests' processes share.
pub const TEST_KEK: &str = "6b1f0c7a93e24d58a1c6f02b8d9e47a35c0b1e2f3a4d5c6b7e8f90a1b2c3d4e5";

/// The audit signing key the tests' processes share.
pub const TEST_AUDIT_KEY: &str =
    "PRIVATE+KEY+stele.test/audit+099872a6+AWt6T/hW+HBD1bD4CvLmkhSImdqGtb4BqI9HAVMBfsOr";

pub fn stele() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_stele"));
    command
        .env_remove("STELE_DATABASE_URL")
        .env_remove("STELE_DATA_DIR")
        .env_remove("STELE_KEK_FILE")
        // The deployment's key-encryption key (the embedded store would make its own).
        .env("STELE_KEK", TEST_KEK)
        .env("STELE_AUDIT_KEY", TEST_AUDIT_KEY)
        .env_remove("STELE_AUDIT_KEY_FILE")
        .env("STELE_LOG", "info");
    command
}

pub fn run(args: &[&str]) -> Output {
    stele().args(args).output().expect("run stele")
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Reads `child`'s stderr until the start-up line; returns the API's address when it printed one.
/// The rest of its stderr is drained in the background (and kept, see [`Drained`]).
pub fn wait_until_up(child: &mut std::process::Child) -> Option<String> {
    wait_until_up_keeping(child).0
}

/// The lines a process printed (its start-up lines included).
pub type Drained = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// [`wait_until_up`], also returning what the process printed and prints.
pub fn wait_until_up_keeping(child: &mut std::process::Child) -> (Option<String>, Drained) {
    let mut reader = BufReader::new(child.stderr.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut address = None;
    let mut line = String::new();
    let drained = Drained::default();
    while !line.contains("stele is up") {
        assert!(Instant::now() < deadline, "no start-up line");
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "exited early");
        if let Some(rest) = line.split("listening on http://").nth(1) {
            address = rest.split(';').next().map(str::to_owned);
        }
        // Kept too: adapters may log before the start-up line.
        drained.lock().unwrap().push(line.clone());
    }
    let keep = drained.clone();
    std::thread::spawn(move || {
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap_or(0) > 0 {
            keep.lock().unwrap().push(std::mem::take(&mut line));
        }
    });
    (address, drained)
}

/// Stops `child` with SIGTERM and expects a clean exit within a minute; a process that does not
/// stop by then is killed and the test fails saying so (instead of waiting for it forever).
pub fn terminate(child: &mut std::process::Child) {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the process did not stop within 60 s of SIGTERM (killed)");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
}

/// A free port on loopback (bound and released: good enough for a test's own server).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A PostgreSQL 16 cluster of one test's own, from the binaries `scripts/test` provisions
/// (`STELE_PG_BIN`), so that the test can stop and restart it without disturbing the others.
pub struct PrivatePostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
}

impl PrivatePostgres {
    pub fn start() -> PrivatePostgres {
        let bin =
            PathBuf::from(std::env::var("STELE_PG_BIN").expect(
                "STELE_PG_BIN is not set: run the test suite with scripts/test (see README)",
            ));
        let dir = tempfile::Builder::new()
            .prefix("stele-pg-")
            .tempdir()
            .unwrap();
        let user = server_user();
        if let Some(user) = &user {
            chown(dir.path(), user);
        }
        let data = dir.path().join("data");
        let initdb = as_user(&user, &bin.join("initdb"))
            .args(["-D", &data.display().to_string(), "-U", "postgres"])
            .args(["--auth=trust", "-E", "UTF8", "--locale=C"])
            .output()
            .unwrap();
        assert!(
            initdb.status.success(),
            "{}",
            String::from_utf8_lossy(&initdb.stderr)
        );
        let server = PrivatePostgres {
            dir,
            bin,
            port: free_port(),
        };
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200",
            server.port,
            server.dir.path().display()
        );
        server.ctl(&["start", "-w", "-t", "30", "-o", &options]);
        server
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// `pg_ctl stop -m fast`: every connection is cut.
    pub fn stop(&self) {
        self.ctl(&["stop", "-m", "fast", "-w", "-t", "60"]);
    }

    /// Starts it again after [`PrivatePostgres::stop`], with the same settings.
    pub fn start_again(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        self.ctl(&["start", "-w", "-t", "30", "-o", &options]);
    }

    pub fn psql(&self, database: &str, sql: &str) {
        let output = Command::new(self.bin.join("psql"))
            .args([
                &self.url(database),
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn ctl(&self, args: &[&str]) {
        let data = self.dir.path().join("data");
        let log = self.dir.path().join("server.log");
        let output = as_user(&server_user(), &self.bin.join("pg_ctl"))
            .args([
                "-D",
                &data.display().to_string(),
                "-l",
                &log.display().to_string(),
            ])
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "pg_ctl {args:?}: {}{}",
            String::from_utf8_lossy(&output.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = as_user(&server_user(), &self.bin.join("pg_ctl"))
            .args(["-D", &data.display().to_string(), "stop", "-m", "immediate"])
            .output();
    }
}

/// PostgreSQL refuses to run as root: as root, the server runs as `postgres` (or the user
/// `scripts/services.sh` made for it).
fn server_user() -> Option<String> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root {
        return None;
    }
    ["postgres", "stele-pg"]
        .into_iter()
        .find(|user| {
            Command::new("id")
                .args(["-u", user])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(str::to_owned)
}

fn as_user(user: &Option<String>, program: &Path) -> Command {
    match user {
        Some(user) => {
            let mut command = Command::new("runuser");
            command.args(["-u", user, "--"]).arg(program);
            command
        }
        None => Command::new(program),
    }
}

fn chown(path: &Path, user: &str) {
    let status = Command::new("chown")
        .args([&format!("{user}:"), &path.display().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// The shipped roles with the scripted rules of `dev_pipeline.toml` first (the pipeline writes,
/// runs and tests a page with its tools), written into `dir`; the file's path.
pub fn dev_models(dir: &Path) -> String {
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/models/agents.toml"))
            .unwrap();
    let rules = include_str!("dev_pipeline.toml");
    let models = shipped.replacen(
        "[providers.scripted]\nkind = \"scripted\"\n",
        &format!("[providers.scripted]\nkind = \"scripted\"\n{rules}"),
        1,
    );
    assert_ne!(
        models, shipped,
        "the shipped file's scripted provider moved"
    );
    let file = dir.join("dev-models.toml");
    std::fs::write(&file, models).unwrap();
    file.display().to_string()
}

/// Every file of `dir` that holds `needle`, with the bytes around it.
pub fn files_holding(dir: &std::path::Path, needle: &[u8]) -> Vec<String> {
    let mut folders = vec![dir.to_path_buf()];
    let mut found = Vec::new();
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                folders.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                if let Some(at) = bytes.windows(needle.len()).position(|w| w == needle) {
                    let context = &bytes[at.saturating_sub(100)..(at + 60).min(bytes.len())];
                    let context = String::from_utf8_lossy(context);
                    found.push(format!("{}: …{context:?}…", path.display()));
                }
            }
        }
    }
    found
}
