//! One child process of a local cluster: where its binary lies, how it is spawned (stderr to a
//! log file, stdout read for the ready line), how it is signalled and waited for, and the tail
//! of its log for error messages. A `Process` is SIGKILLed and reaped when dropped, so a test
//! that fails half-way leaks nothing.

use std::ffi::OsStr;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use pd_common::node::ReadyLine;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// How many log lines an error message quotes.
const LOG_TAIL_LINES: usize = 40;
/// How often a wait for an exit looks again.
const EXIT_POLL: Duration = Duration::from_millis(20);

/// The directory holding `pd-prefill`, `pd-decode` and `pd-router`: `PD_BIN_DIR`, else the
/// directory of the running executable, or its parent when that is `deps` (integration tests
/// run from `target/<profile>/deps`, the binaries lie one level up).
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PD_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().context("locating the running executable")?;
    let dir = exe
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", exe.display()))?;
    match dir.parent() {
        Some(parent) if dir.file_name() == Some(OsStr::new("deps")) => Ok(parent.to_path_buf()),
        _ => Ok(dir.to_path_buf()),
    }
}

/// The path of the node binary `name`, which must exist.
pub fn binary(name: &str) -> Result<PathBuf> {
    let path = bin_dir()?.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !path.is_file() {
        bail!(
            "the `{name}` binary is missing ({} does not exist): run `cargo build --workspace \
             --bins` first, or point PD_BIN_DIR at the directory that holds it",
            path.display()
        );
    }
    Ok(path)
}

/// A running child with its log; killed and reaped on drop.
pub struct Process {
    /// The node id, or `router` / `etcd`: names the process in messages.
    name: String,
    child: Child,
    pid: u32,
    log: PathBuf,
    /// The first ready line, until taken by `wait_ready`.
    ready: Option<oneshot::Receiver<ReadyLine>>,
    /// Whether `newly_exited` has already reported the exit.
    exit_reported: bool,
}

impl Process {
    /// Spawns `command` with stdin closed, stderr appended to `log` and stdout drained by a
    /// thread that watches for the ready line.
    pub fn spawn(mut command: Command, name: &str, log: PathBuf) -> io::Result<Process> {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            // Its own process group: a Ctrl-C at the launcher's terminal reaches the launcher
            // only, which then stops the children in order (router, nodes, etcd last).
            .process_group(0);
        die_with_parent(&mut command);
        let mut child = command.spawn()?;
        let stdout = child.stdout.take();
        let mut process = Process {
            name: name.to_string(),
            pid: child.id(),
            child,
            log,
            ready: None,
            exit_reported: false,
        };
        // On an error here, dropping `process` kills the child.
        if let Some(stdout) = stdout {
            process.ready = Some(watch_stdout(stdout, name)?);
        }
        Ok(process)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Waits for the ready line until `deadline`; fails with the log tail if the process exits
    /// first or stays silent.
    pub async fn wait_ready(&mut self, deadline: Instant) -> Result<ReadyLine> {
        let Some(ready) = self.ready.take() else {
            bail!("{}: already waited for its ready line", self.name);
        };
        match tokio::time::timeout_at(deadline, ready).await {
            Ok(Ok(line)) => Ok(line),
            // Stdout closed without a ready line: the process is exiting.
            Ok(Err(_)) => {
                let status = self
                    .wait_exit(Instant::now() + Duration::from_secs(5))
                    .await;
                let status = status.map_or("no exit status yet".to_string(), |s| s.to_string());
                bail!(
                    "{} exited ({status}) before it printed its ready line\n{}",
                    self.name,
                    self.log_tail()
                )
            }
            Err(_) => bail!(
                "{} printed no ready line in time (pid {})\n{}",
                self.name,
                self.pid,
                self.log_tail()
            ),
        }
    }

    /// The exit status, if the process has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The exit status, once: for reporting a process that went away unasked.
    pub fn newly_exited(&mut self) -> Option<ExitStatus> {
        if self.exit_reported {
            return None;
        }
        let status = self.try_exit()?;
        self.exit_reported = true;
        Some(status)
    }

    /// Sends SIGTERM, unless the process has exited already.
    pub fn terminate(&mut self) -> Result<()> {
        // An exited child is reaped here, and the pid of a reaped child may name another
        // process by now; an unreaped one (a zombie at worst) still holds its pid.
        if self.try_exit().is_some() {
            return Ok(());
        }
        let pid = libc::pid_t::try_from(self.pid).context("pid out of range")?;
        // SAFETY: kill(2) touches no memory of ours; the pid is our unreaped child's.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            bail!("SIGTERM to {} (pid {}): {e}", self.name, self.pid);
        }
        Ok(())
    }

    /// SIGKILL and reap, as a crash would end it.
    pub fn kill(&mut self) {
        self.start_kill();
        let _ = self.child.wait();
    }

    /// SIGKILL without waiting, so several processes die at once.
    pub fn start_kill(&mut self) {
        // Fails only when the process is already gone.
        let _ = self.child.kill();
    }

    /// Polls for the exit until `deadline`.
    pub async fn wait_exit(&mut self, deadline: Instant) -> Option<ExitStatus> {
        loop {
            if let Some(status) = self.try_exit() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(EXIT_POLL).await;
        }
    }

    /// Waits for an exit asked for with `terminate`; SIGKILLs the process at `deadline`. An
    /// error when it had to be killed or did not exit with success.
    pub async fn finish_stop(&mut self, deadline: Instant) -> Result<()> {
        match self.wait_exit(deadline).await {
            Some(status) if status.success() => Ok(()),
            Some(status) => bail!(
                "{} exited with {status} after SIGTERM\n{}",
                self.name,
                self.log_tail()
            ),
            None => {
                self.kill();
                bail!(
                    "{} did not exit in time after SIGTERM and was killed\n{}",
                    self.name,
                    self.log_tail()
                )
            }
        }
    }

    /// SIGTERM, then wait until `timeout` (SIGKILL after it).
    pub async fn stop(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        self.terminate()?;
        self.finish_stop(deadline).await
    }

    /// The last lines of the log, headed by its path.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log, LOG_TAIL_LINES)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads `stdout` to its end on a thread of its own, so the child never blocks on a full pipe;
/// the first line that parses as a ready line is sent on the returned channel. A thread rather
/// than a task: it outlives the runtime of the test that started it.
fn watch_stdout(stdout: ChildStdout, name: &str) -> io::Result<oneshot::Receiver<ReadyLine>> {
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name(format!("stdout-{name}"))
        .spawn(move || {
            let mut tx = Some(tx);
            let mut reader = BufReader::new(stdout);
            let mut line = Vec::new();
            loop {
                line.clear();
                // Bytes, not `lines()`: a line that is not UTF-8 must not stop the draining.
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let Ok(ready) = serde_json::from_slice::<ReadyLine>(&line) else {
                    continue;
                };
                if ready.event == "ready" {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(ready);
                    }
                }
            }
        })?;
    Ok(rx)
}

/// Has the kernel SIGKILL the child when the process that spawned it dies, so a launcher or a
/// test binary killed outright leaves no node behind. Linux ties this to the spawning thread:
/// clusters are started from runtime worker threads, which live as long as the cluster.
#[cfg(target_os = "linux")]
fn die_with_parent(command: &mut Command) {
    let parent = libc::pid_t::try_from(std::process::id()).unwrap_or(0);
    // SAFETY: the hook runs between fork and exec, and calls only prctl(2) and getppid(2),
    // which are async-signal-safe, and builds errors without allocating.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before the prctl took effect.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_command: &mut Command) {}

/// The last `lines` lines of the file at `path` (reading at most its last 64 KiB).
pub fn log_tail(path: &Path, lines: usize) -> String {
    const MAX_BYTES: u64 = 64 * 1024;
    let read = || -> io::Result<String> {
        let mut file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(MAX_BYTES)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            let tail = all[all.len().saturating_sub(lines)..].join("\n");
            format!("--- last lines of {} ---\n{tail}", path.display())
        }
        Err(e) => format!("--- no log at {}: {e} ---", path.display()),
    }
}
