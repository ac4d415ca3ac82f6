//! An ephemeral PostgreSQL cluster: a temp dir, a free port, `wal_level=logical`, stopped and
//! removed on drop. When the process runs as root, the server runs as the `postgres` user.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::TestkitError;

/// Where initdb/pg_ctl live: `$WEIR_PG_BINDIR`, Debian's PostgreSQL 15, or PATH.
pub fn find_pg_bindir(env_override: Option<&Path>) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let candidates = env_override
        .map(Path::to_path_buf)
        .into_iter()
        .chain([PathBuf::from("/usr/lib/postgresql/15/bin")])
        .chain(std::env::split_paths(&path));
    candidates.into_iter().find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file())
}

#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Install postgresql-15 with apt-get when missing (root only).
    pub install_if_missing: bool,
    /// Extra `postgresql.conf` lines.
    pub extra_conf: Vec<String>,
    /// Where to put the cluster's folder (default: the system temp dir).
    pub parent_dir: Option<PathBuf>,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self { install_if_missing: true, extra_conf: vec![], parent_dir: None }
    }
}

/// A running throwaway cluster. Superuser `postgres`, trust authentication on loopback.
#[derive(Debug)]
pub struct PgCluster {
    bindir: PathBuf,
    dir: Option<tempfile::TempDir>,
    data: PathBuf,
    port: u16,
    run_as: Option<(u32, u32)>,
    running: bool,
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false)
}

fn postgres_ids() -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let o = Command::new("id").args([flag, "postgres"]).output().ok()?;
        String::from_utf8_lossy(&o.stdout).trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

fn run(cmd: &mut Command) -> Result<Output, TestkitError> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(|source| TestkitError::Io { what: format!("running {shown}"), source })?;
    if !out.status.success() {
        let mut message = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if message.is_empty() {
            message = String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        return Err(TestkitError::Command { command: shown, message });
    }
    Ok(out)
}

fn free_port() -> Result<u16, TestkitError> {
    let l = TcpListener::bind("127.0.0.1:0")
        .map_err(|source| TestkitError::Io { what: "finding a free port".into(), source })?;
    l.local_addr().map(|a| a.port()).map_err(|source| TestkitError::Io { what: "finding a free port".into(), source })
}

fn install_postgres() -> Result<(), TestkitError> {
    if !is_root() {
        return Err(TestkitError::NoPostgres {
            hint: ": install postgresql-15 (apt-get install postgresql-15)".into(),
        });
    }
    tracing::info!("installing postgresql-15 with apt-get");
    run(Command::new("apt-get").arg("update").arg("-qq"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "postgresql-15"])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    Ok(())
}

impl PgCluster {
    pub fn start() -> Result<Self, TestkitError> {
        Self::start_with(&PgOptions::default())
    }

    pub fn start_with(opts: &PgOptions) -> Result<Self, TestkitError> {
        let env_bindir = std::env::var_os("WEIR_PG_BINDIR").map(PathBuf::from);
        let bindir = match find_pg_bindir(env_bindir.as_deref()) {
            Some(b) => b,
            None if opts.install_if_missing => {
                install_postgres()?;
                find_pg_bindir(env_bindir.as_deref())
                    .ok_or(TestkitError::NoPostgres { hint: " even after apt-get install".into() })?
            }
            None => {
                return Err(TestkitError::NoPostgres { hint: String::new() });
            }
        };
        let run_as = if is_root() {
            Some(
                postgres_ids()
                    .ok_or(TestkitError::NoPostgres { hint: ": running as root needs the `postgres` user".into() })?,
            )
        } else {
            None
        };
        let mut builder = tempfile::Builder::new();
        builder.prefix("weir-pg-");
        let dir = match &opts.parent_dir {
            Some(p) => builder.tempdir_in(p),
            None => builder.tempdir(),
        }
        .map_err(|source| TestkitError::Io { what: "creating the cluster's temp dir".into(), source })?;
        let data = dir.path().join("data");
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).map_err(|source| TestkitError::Io {
                what: format!("handing {} to postgres", dir.path().display()),
                source,
            })?;
        }
        let mut cluster = Self { bindir, data, dir: Some(dir), port: 0, run_as, running: false };
        cluster.initdb(&opts.extra_conf)?;
        // A port picked free may be taken before the server binds it: try a few.
        let mut last = None;
        for _ in 0..5 {
            cluster.port = free_port()?;
            match cluster.pg_ctl_start() {
                Ok(()) => {
                    cluster.running = true;
                    return Ok(cluster);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least one attempt"))
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(self.bindir.join(program));
        if let Some((uid, gid)) = self.run_as {
            c.uid(uid).gid(gid);
        }
        c.env_remove("PGDATA").env("LC_ALL", "C.UTF-8");
        if let Some(dir) = &self.dir {
            c.current_dir(dir.path());
        }
        c
    }

    fn initdb(&self, extra_conf: &[String]) -> Result<(), TestkitError> {
        run(self.command("initdb").arg("-D").arg(&self.data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        ]))?;
        let mut conf = vec![
            "listen_addresses = '127.0.0.1'".to_string(),
            format!("unix_socket_directories = '{}'", self.data.display()),
            "wal_level = logical".into(),
            "max_replication_slots = 16".into(),
            "max_wal_senders = 16".into(),
            "max_connections = 200".into(),
            "shared_buffers = '256MB'".into(),
            "work_mem = '64MB'".into(),
            "maintenance_work_mem = '256MB'".into(),
            "max_wal_size = '4GB'".into(),
            // A throwaway cluster: durability is not the point, speed is.
            "fsync = off".into(),
            "synchronous_commit = off".into(),
            "full_page_writes = off".into(),
            "timezone = 'UTC'".into(),
            "logging_collector = off".into(),
        ];
        conf.extend(extra_conf.iter().cloned());
        let path = self.data.join("postgresql.auto.conf");
        let mut text = std::fs::read_to_string(&path).unwrap_or_default();
        text.push_str(&conf.join("\n"));
        text.push('\n');
        std::fs::write(&path, text)
            .map_err(|source| TestkitError::Io { what: format!("writing {}", path.display()), source })
    }

    fn pg_ctl_start(&self) -> Result<(), TestkitError> {
        let log = self.data.join("server.log");
        run(self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "60", "-o"])
            .arg(format!("-p {}", self.port))
            .arg("start"))
        .map(|_| ())
        .map_err(|e| match e {
            TestkitError::Command { command, message } => {
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = tail.lines().rev().take(5).collect();
                TestkitError::Command {
                    command,
                    message: format!(
                        "{message}; server log: {}",
                        tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                    ),
                }
            }
            other => other,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// `postgres://postgres@127.0.0.1:PORT/DB`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates a database and returns its URL.
    pub fn create_database(&self, name: &str) -> Result<String, TestkitError> {
        run(self.command("createdb").args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", name]))?;
        Ok(self.url(name))
    }

    /// Stops the server (fast shutdown); the data stays until drop.
    pub fn stop(&mut self) -> Result<(), TestkitError> {
        if self.running {
            run(self.command("pg_ctl").arg("-D").arg(&self.data).args(["-m", "fast", "-w", "stop"]))?;
            self.running = false;
        }
        Ok(())
    }

    /// Starts a stopped server again on the same port.
    pub fn restart(&mut self) -> Result<(), TestkitError> {
        self.stop()?;
        self.pg_ctl_start()?;
        self.running = true;
        Ok(())
    }

    /// Leaves the cluster running after this value is dropped (for `weir demo --keep`);
    /// returns the data directory to stop it with `pg_ctl -D DIR stop`.
    pub fn keep(mut self) -> PathBuf {
        self.running = false;
        if let Some(dir) = self.dir.take() {
            let _ = dir.keep();
        }
        self.data.clone()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.running {
            let _ = self.command("pg_ctl").arg("-D").arg(&self.data).args(["-m", "immediate", "-w", "stop"]).output();
        }
    }
}
