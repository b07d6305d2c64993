//! `shell.run`'s sandbox: a command runs in a copy of its run's workspace, with no network, the
//! workspace as the only writable place, limits on CPU time, memory, processes, file size and
//! output, and a timeout; the files it leaves become the workspace's next version.
//!
//! Two isolations, the strongest the machine allows (`auto`), or one required by the settings:
//! - **bubblewrap** (`bwrap`): new user, PID, network, IPC and UTS namespaces; the system's
//!   `/usr` read-only, a private `/tmp`, `/proc` and `/dev`; the workspace bound read-write at
//!   `/workspace`; an empty environment.
//! - **process**: a plain child process in the workspace with an empty environment and the same
//!   resource limits; its own network namespace when the node may make one (as root), but the
//!   file system is the node's, read-only only where the account lacks rights.
//!
//! Either way a node running as root runs commands as `nobody` (uid 65534), which the process
//! limit then counts (the kernel ignores it for root).
//!
//! Hand-written on `libc` for `setrlimit`, `unshare` and the change of user in the child (before
//! `exec`): no maintained crate wraps bubblewrap, and these are three system calls.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

use crate::workspace::{clean_path, Files, WorkspaceError, WorkspaceLimits};

/// The uid (and gid) commands run as when the node runs as root.
const NOBODY: u32 = 65534;

/// Which isolation to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxMode {
    /// bubblewrap when it is installed and works here, the process sandbox otherwise.
    #[default]
    Auto,
    /// bubblewrap or nothing: the node does not start without it.
    Bubblewrap,
    /// The process sandbox, even where bubblewrap is installed.
    Process,
}

impl std::str::FromStr for SandboxMode {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "auto" => Ok(SandboxMode::Auto),
            "bubblewrap" | "bwrap" => Ok(SandboxMode::Bubblewrap),
            "process" => Ok(SandboxMode::Process),
            other => Err(format!(
                "unknown sandbox {other:?}: use auto, bubblewrap or process"
            )),
        }
    }
}

/// The sandbox's limits.
#[derive(Clone, Debug)]
pub struct SandboxLimits {
    /// A command's time limit when it asks for none.
    pub timeout: Duration,
    /// The longest a command may ask for.
    pub max_timeout: Duration,
    /// Address space of each process.
    pub memory_bytes: u64,
    /// Processes (and threads) at once, counted for the sandbox's user.
    pub max_processes: u64,
    /// Bytes of stdout and of stderr kept (the rest is counted, not kept).
    pub output_bytes: usize,
}

impl Default for SandboxLimits {
    fn default() -> Self {
        SandboxLimits {
            timeout: Duration::from_secs(60),
            max_timeout: Duration::from_secs(600),
            memory_bytes: 2 * 1024 * 1024 * 1024,
            max_processes: 64,
            output_bytes: 64 * 1024,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Isolation {
    Bubblewrap(PathBuf),
    /// The process sandbox; whether it has its own network namespace.
    Process {
        own_network: bool,
    },
}

/// A sandbox, as detected on this machine.
#[derive(Clone, Debug)]
pub struct Sandbox {
    isolation: Isolation,
    limits: SandboxLimits,
    files: WorkspaceLimits,
    /// Run as `nobody` (the node is root).
    drop_to_nobody: bool,
}

/// What one command did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunReport {
    pub command: String,
    /// Its exit code; none when a signal ended it.
    pub exit_code: Option<i32>,
    /// The signal that ended it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub stdout: String,
    pub stderr: String,
    /// Bytes written to stdout and stderr, kept or not.
    pub output_bytes: u64,
    /// Whether output was cut at the limit.
    pub truncated: bool,
    pub duration_ms: u64,
    /// The isolation it ran in.
    pub sandbox: String,
    /// Files the command created, changed or deleted.
    pub changed: Vec<String>,
    /// What the command left that a workspace does not keep (links, special files, too big).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_kept: Vec<String>,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

impl Sandbox {
    /// The sandbox `mode` asks for, as this machine allows it: an error when bubblewrap is
    /// required and missing or not working.
    pub async fn detect(
        mode: SandboxMode,
        limits: SandboxLimits,
        files: WorkspaceLimits,
    ) -> Result<Sandbox, String> {
        let drop_to_nobody = is_root();
        let mut sandbox = Sandbox {
            isolation: Isolation::Process { own_network: false },
            limits,
            files,
            drop_to_nobody,
        };
        if mode != SandboxMode::Process {
            match which_bwrap() {
                Some(bwrap) => {
                    sandbox.isolation = Isolation::Bubblewrap(bwrap);
                    match sandbox.probe().await {
                        Ok(()) => return Ok(sandbox),
                        Err(e) if mode == SandboxMode::Bubblewrap => {
                            return Err(format!("bubblewrap does not work here: {e}"))
                        }
                        Err(e) => tracing::debug!(
                            error = %e,
                            "bubblewrap is installed but does not work here: commands run in the process sandbox"
                        ),
                    }
                }
                None if mode == SandboxMode::Bubblewrap => {
                    return Err(
                        "the sandbox is set to bubblewrap, and `bwrap` is not installed (Debian: apt-get install bubblewrap)"
                            .into(),
                    )
                }
                None => tracing::debug!(
                    "bubblewrap (bwrap) is not installed: commands run in the process sandbox, which shares the node's file system"
                ),
            }
        }
        sandbox.isolation = Isolation::Process { own_network: true };
        if sandbox.probe().await.is_err() {
            sandbox.isolation = Isolation::Process { own_network: false };
            sandbox.probe().await?;
        }
        Ok(sandbox)
    }

    /// Runs `true` in the sandbox: whether it works here.
    async fn probe(&self) -> Result<(), String> {
        let (report, _) = self
            .run(&Files::default(), "true", Some(Duration::from_secs(20)))
            .await
            .map_err(|e| e.to_string())?;
        match report.exit_code {
            Some(0) => Ok(()),
            _ => Err(format!(
                "a trial command failed: {}",
                report.stderr.trim().lines().last().unwrap_or("no message")
            )),
        }
    }

    /// Which isolation is active, in a few words (for the start-up line and each report).
    pub fn describe(&self) -> String {
        let user = if self.drop_to_nobody {
            ", as nobody"
        } else {
            ""
        };
        match &self.isolation {
            Isolation::Bubblewrap(_) => format!(
                "bubblewrap (no network, read-only system, the workspace the only writable place{user})"
            ),
            Isolation::Process { own_network: true } => format!(
                "process (no network, resource limits{user}; the node's file system is visible)"
            ),
            Isolation::Process { own_network: false } => format!(
                "process (resource limits{user}; network NOT isolated, the node's file system is visible)"
            ),
        }
    }

    /// The short name of the isolation: `bubblewrap` or `process`.
    pub fn kind(&self) -> &'static str {
        match self.isolation {
            Isolation::Bubblewrap(_) => "bubblewrap",
            Isolation::Process { .. } => "process",
        }
    }

    pub fn limits(&self) -> &SandboxLimits {
        &self.limits
    }

    /// Runs `command` (a `sh -c` line) over a copy of `files`: its report and the files it left.
    pub async fn run(
        &self,
        files: &Files,
        command: &str,
        timeout: Option<Duration>,
    ) -> Result<(RunReport, Files), WorkspaceError> {
        let timeout = timeout
            .unwrap_or(self.limits.timeout)
            .min(self.limits.max_timeout);
        let dir = tempfile::Builder::new()
            .prefix("stele-workspace-")
            .tempdir()
            .map_err(|e| WorkspaceError::Store(format!("no room for a workspace: {e}")))?;
        let work = dir.path().join("workspace");
        materialize(files, &work, self.drop_to_nobody).map_err(|e| {
            WorkspaceError::Store(format!("the workspace could not be laid out: {e}"))
        })?;

        let mut cmd = match &self.isolation {
            Isolation::Bubblewrap(bwrap) => bubblewrap(bwrap, &work, command),
            Isolation::Process { .. } => {
                let mut cmd = Command::new("/bin/sh");
                cmd.arg("-c").arg(command).current_dir(&work).env_clear();
                for (key, value) in sandbox_env(&work) {
                    cmd.env(key, value);
                }
                cmd
            }
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        let limits = ChildLimits {
            cpu_seconds: timeout.as_secs().max(1) + 1,
            memory_bytes: self.limits.memory_bytes,
            max_processes: self.drop_to_nobody.then_some(self.limits.max_processes),
            file_bytes: self.files.max_file_bytes as u64,
            own_network: matches!(self.isolation, Isolation::Process { own_network: true }),
            drop_to_nobody: self.drop_to_nobody,
        };
        // SAFETY: the closure only makes async-signal-safe system calls (setrlimit, unshare,
        // setgroups, setgid, setuid) on values copied in before the fork.
        unsafe {
            cmd.pre_exec(move || limits.apply());
        }
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .map_err(|e| WorkspaceError::Store(format!("the sandbox could not start: {e}")))?;
        let pid = child.id();
        let cap = self.limits.output_bytes;
        let stdout = tokio::spawn(bounded(child.stdout.take(), cap));
        let stderr = tokio::spawn(bounded(child.stderr.take(), cap));
        let (status, timed_out) = match tokio::time::timeout(timeout, child.wait()).await {
            Ok(status) => (status.ok(), false),
            Err(_) => {
                if let Some(pid) = pid {
                    // SAFETY: kill on the child's process group (its own, from process_group(0)).
                    unsafe {
                        libc::kill(-(pid as i32), libc::SIGKILL);
                    }
                }
                (child.wait().await.ok(), true)
            }
        };
        let duration_ms = started.elapsed().as_millis() as u64;
        // A process that left the sandbox's group could hold the pipes open: output is waited
        // for a moment after the command ended, not longer.
        let drain = |reader: tokio::task::JoinHandle<(String, u64, bool)>| async move {
            let abort = reader.abort_handle();
            match tokio::time::timeout(Duration::from_secs(2), reader).await {
                Ok(read) => read.unwrap_or_default(),
                Err(_) => {
                    abort.abort();
                    (String::new(), 0, true)
                }
            }
        };
        let (stdout, out_bytes, out_cut) = drain(stdout).await;
        let (stderr, err_bytes, err_cut) = drain(stderr).await;
        let (after, not_kept) = collect(&work, &self.files).map_err(|e| {
            WorkspaceError::Store(format!("the workspace could not be read back: {e}"))
        })?;
        let mut changed: Vec<String> = after
            .0
            .iter()
            .filter(|(path, bytes)| files.0.get(*path) != Some(bytes))
            .map(|(path, _)| path.clone())
            .chain(
                files
                    .0
                    .keys()
                    .filter(|p| !after.0.contains_key(*p))
                    .cloned(),
            )
            .collect();
        changed.sort();
        let report = RunReport {
            command: command.to_owned(),
            exit_code: status.and_then(|s| s.code()),
            signal: status.and_then(|s| s.signal()),
            timed_out,
            stdout,
            stderr,
            output_bytes: out_bytes + err_bytes,
            truncated: out_cut || err_cut,
            duration_ms,
            sandbox: self.kind().to_owned(),
            changed,
            not_kept,
        };
        Ok((report, after))
    }
}

/// `bwrap` on the PATH (or Debian's place).
fn which_bwrap() -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/bin")])
        .map(|dir| dir.join("bwrap"))
        .find(|path| path.is_file())
}

/// The environment a command sees: nothing of the node's.
fn sandbox_env(home: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("PATH", "/usr/local/bin:/usr/bin:/bin".into()),
        ("HOME", home.display().to_string()),
        ("LANG", "C.UTF-8".into()),
        ("TMPDIR", "/tmp".into()),
    ]
}

fn bubblewrap(bwrap: &Path, work: &Path, command: &str) -> Command {
    let mut cmd = Command::new(bwrap);
    cmd.args([
        "--die-with-parent",
        "--new-session",
        "--unshare-all",
        "--hostname",
        "sandbox",
        "--ro-bind",
        "/usr",
        "/usr",
    ]);
    // The top-level folders Debian links into /usr stay links; others are bound read-only.
    for top in ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"] {
        let path = Path::new(top);
        match std::fs::read_link(path) {
            Ok(target) => {
                cmd.arg("--symlink").arg(target).arg(top);
            }
            Err(_) if path.is_dir() => {
                cmd.args(["--ro-bind", top, top]);
            }
            Err(_) => {}
        }
    }
    // What programs need of /etc (the dynamic linker's cache, alternatives, certificates,
    // users), and nothing else of it.
    for etc in [
        "/etc/ld.so.cache",
        "/etc/ld.so.conf",
        "/etc/ld.so.conf.d",
        "/etc/alternatives",
        "/etc/ssl",
        "/etc/ca-certificates",
        "/etc/localtime",
        "/etc/passwd",
        "/etc/group",
        "/etc/nsswitch.conf",
    ] {
        cmd.args(["--ro-bind-try", etc, etc]);
    }
    cmd.args([
        "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--bind",
    ])
    .arg(work)
    .args(["/workspace", "--chdir", "/workspace", "--clearenv"]);
    for (key, value) in sandbox_env(Path::new("/workspace")) {
        cmd.args(["--setenv", key]).arg(value);
    }
    cmd.args(["--", "/bin/sh", "-c", command]);
    cmd
}

/// Limits set in the child between fork and exec.
#[derive(Clone, Copy)]
struct ChildLimits {
    cpu_seconds: u64,
    memory_bytes: u64,
    max_processes: Option<u64>,
    file_bytes: u64,
    own_network: bool,
    drop_to_nobody: bool,
}

impl ChildLimits {
    fn apply(&self) -> io::Result<()> {
        fn limit(resource: libc::__rlimit_resource_t, value: u64) -> io::Result<()> {
            let rlim = libc::rlimit {
                rlim_cur: value,
                rlim_max: value,
            };
            // SAFETY: setrlimit with a valid pointer to a stack value.
            if unsafe { libc::setrlimit(resource, &rlim) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        }
        limit(libc::RLIMIT_CPU, self.cpu_seconds)?;
        limit(libc::RLIMIT_AS, self.memory_bytes)?;
        limit(libc::RLIMIT_FSIZE, self.file_bytes)?;
        limit(libc::RLIMIT_NOFILE, 256)?;
        limit(libc::RLIMIT_CORE, 0)?;
        if let Some(processes) = self.max_processes {
            limit(libc::RLIMIT_NPROC, processes)?;
        }
        // SAFETY: plain system calls on no memory of ours.
        unsafe {
            if self.own_network && libc::unshare(libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            if self.drop_to_nobody
                && (libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(NOBODY) != 0
                    || libc::setuid(NOBODY) != 0)
            {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// Lays `files` out under `work` (owned by `nobody` when commands run as it).
fn materialize(files: &Files, work: &Path, for_nobody: bool) -> io::Result<()> {
    std::fs::create_dir_all(work)?;
    for (path, bytes) in &files.0 {
        let target = work.join(path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&target, bytes)?;
    }
    if for_nobody {
        let root = work.parent().unwrap_or(work);
        for entry in walkdir::WalkDir::new(root) {
            let entry = entry.map_err(io::Error::other)?;
            std::os::unix::fs::lchown(entry.path(), Some(NOBODY), Some(NOBODY))?;
        }
    }
    Ok(())
}

/// The regular files a command left under `work`, and what was not kept (with why).
fn collect(work: &Path, limits: &WorkspaceLimits) -> io::Result<(Files, Vec<String>)> {
    let mut files = Files::default();
    let mut not_kept = Vec::new();
    let mut total = 0usize;
    for entry in walkdir::WalkDir::new(work)
        .follow_links(false)
        .sort_by_file_name()
    {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                not_kept.push(format!("(unreadable: {e})"));
                continue;
            }
        };
        let Ok(relative) = entry.path().strip_prefix(work) else {
            continue;
        };
        let Some(relative) = relative.to_str() else {
            not_kept.push(format!("{}: not a UTF-8 name", relative.display()));
            continue;
        };
        if relative.is_empty() || entry.file_type().is_dir() {
            continue;
        }
        let path = match clean_path(relative) {
            Ok(path) => path,
            Err(e) => {
                not_kept.push(e.to_string());
                continue;
            }
        };
        if entry.file_type().is_symlink() {
            not_kept.push(format!(
                "{path}: a symbolic link (a workspace keeps files only)"
            ));
            continue;
        }
        if !entry.file_type().is_file() {
            not_kept.push(format!("{path}: not a regular file"));
            continue;
        }
        let size = entry.metadata().map(|m| m.len() as usize).unwrap_or(0);
        if size > limits.max_file_bytes || total + size > limits.max_bytes {
            not_kept.push(format!("{path}: {size} bytes, over the workspace's limits"));
            continue;
        }
        if files.0.len() >= limits.max_files {
            not_kept.push(format!(
                "{path}: over the workspace's {} files",
                limits.max_files
            ));
            continue;
        }
        total += size;
        files.0.insert(path, std::fs::read(entry.path())?);
    }
    Ok((files, not_kept))
}

/// Reads `pipe` to its end, keeping its first `cap` bytes (as text): the text, the bytes read,
/// whether it was cut.
async fn bounded<R: AsyncRead + Unpin>(pipe: Option<R>, cap: usize) -> (String, u64, bool) {
    let Some(mut pipe) = pipe else {
        return (String::new(), 0, false);
    };
    let mut kept = Vec::new();
    let mut total = 0u64;
    let mut buffer = [0u8; 8192];
    loop {
        match pipe.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                total += n as u64;
                let room = cap.saturating_sub(kept.len());
                kept.extend_from_slice(&buffer[..n.min(room)]);
            }
        }
    }
    let cut = total as usize > kept.len();
    (String::from_utf8_lossy(&kept).into_owned(), total, cut)
}
