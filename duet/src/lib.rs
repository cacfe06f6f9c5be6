//! The duet node: configuration, the cluster manager and the HA runtime around it, daemon
//! wiring, control socket, status. The `duet` binary is a thin CLI over this library.
//!
//! - [`config`]: the TOML contract, parsed and validated with errors that name the key, and
//!   its mapping to the runtime's settings ([`config::runtime`]);
//! - [`cluster`]: the cluster manager (pure: inputs and `now` in, actions out), with a
//!   simulated pair;
//! - [`ha`]: the HA runtime that drives it: heartbeat links, steps, health probes, VIPs;
//! - [`daemon`]: opens stores, serves NBD, the control socket and metrics, stops gracefully;
//! - [`control`]: the versioned JSON-lines protocol between CLI and daemon, and its client;
//! - [`status`]: the `duet status` model and its text form; [`events`]: the event log;
//! - [`md`]: `create-md` and `dump-md`; [`plan`]: `duet check-config`'s description of what
//!   each node will do.

/// `print!` for the CLI's output: see [`write_out`].
#[macro_export]
macro_rules! out {
    ($($t:tt)*) => { $crate::write_out(format_args!($($t)*)) };
}

/// `println!` for the CLI's output: see [`write_out`].
#[macro_export]
macro_rules! outln {
    ($($t:tt)*) => { $crate::write_out(format_args!("{}\n", format_args!($($t)*))) };
}

/// Writes the CLI's output to stdout at once. A reader that went away (`duet status | head -1`,
/// a pager quit early) ends the command quietly with status 0, as the output it wanted was
/// delivered; any other write error ends it with status 1 and says why. `println!` would panic.
pub fn write_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut o = std::io::stdout().lock();
    match o.write_fmt(args).and_then(|()| o.flush()) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("duet: writing the output failed: {e}");
            std::process::exit(1);
        }
    }
}

pub mod cluster;
pub mod config;
pub mod connection_test;
pub mod control;
pub mod daemon;
pub mod events;
pub mod ha;
pub mod manpage;
pub mod md;
pub mod page;
pub mod plan;
pub mod schedule;
pub mod state;
pub mod status;

/// An error with its sources, `outer: inner: …` (for messages that leave as one string: a
/// control reply, an event line, the daemon's last words). A source whose message already ends
/// the text is not repeated: some errors (the store's, the metadata's) name their source in
/// their own message as well.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let m = c.to_string();
        if !s.ends_with(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = c.source();
    }
    s
}

/// Whether `journal_stream` (systemd's `JOURNAL_STREAM`, `DEVICE:INODE`) names the file whose
/// device and inode these are: stderr goes to the journal only when it names stderr (a child
/// that inherited the variable but writes elsewhere does not).
pub fn is_journal(journal_stream: Option<&str>, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = journal_stream.and_then(|v| v.split_once(':')) else { return false };
    d.parse() == Ok(dev) && i.parse() == Ok(ino)
}

/// Whether this process's stderr is connected to the journal.
pub fn stderr_is_journal() -> bool {
    let v = std::env::var("JOURNAL_STREAM").ok();
    nix::sys::stat::fstat(std::io::stderr())
        .is_ok_and(|st| is_journal(v.as_deref(), st.st_dev, st.st_ino))
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("cannot open {path}: {source}")]
    struct Says {
        path: &'static str,
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("resource vol0")]
    struct Outer(#[source] Says);

    #[test]
    fn a_chain_names_each_source_once() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let m = super::error_chain(&Outer(Says { path: "/x", source: io }));
        assert_eq!(m, "resource vol0: cannot open /x: entity not found");
    }
}
