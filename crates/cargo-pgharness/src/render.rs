//! How the commands show a run: a spinner for long steps on a terminal, plain lines
//! elsewhere (CI logs), and one line per [`RunEvent`] in words a user can act on.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use pgharness::events::Event;
use pgharness::ledger::RunSummary;
use pgharness_runner::RunEvent;

/// A line of the command's own.
pub fn say(message: &str) {
    eprintln!("pgharness: {message}");
}

/// The renderer of a run's events.
#[derive(Default)]
pub struct Renderer {
    step: Mutex<Option<ProgressBar>>,
}

impl Renderer {
    /// A renderer with no step under way.
    pub const fn new() -> Renderer {
        Renderer {
            step: Mutex::new(None),
        }
    }

    /// Shows one event.
    pub fn event(&self, event: RunEvent) {
        match event {
            RunEvent::StepStarted(message) => self.start(&message),
            RunEvent::Step(event) => self.progress(describe(event)),
            RunEvent::StepProgress(message) => self.progress(message),
            RunEvent::StepFinished(message) => self.finish(&message),
            other => {
                if let Some(line) = line(&other) {
                    self.println(&line);
                }
            }
        }
    }

    fn start(&self, message: &str) {
        let mut step = self.step.lock().unwrap_or_else(|e| e.into_inner());
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(100));
            bar.set_message(message.to_owned());
            *step = Some(bar);
        } else {
            say(message);
        }
    }

    fn progress(&self, message: String) {
        match &*self.step.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(bar) => bar.set_message(message),
            None => say(&message),
        }
    }

    fn finish(&self, message: &str) {
        match self.step.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(bar) => bar.finish_with_message(message.to_owned()),
            None => say(message),
        }
    }

    fn println(&self, line: &str) {
        match &*self.step.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(bar) => bar.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }
}

/// What a pgharness event means, in words.
pub fn describe(event: Event) -> String {
    match event {
        Event::Probing { backend } => format!("checking the {backend} backend"),
        Event::CreatingContainer { name, image } => {
            format!("starting container {name} from {image}")
        }
        Event::JoinedContainer { name } => format!("using running container {name}"),
        Event::InitialisingCluster { data_dir } => format!("initdb {data_dir}"),
        Event::StartingServer { listen } => format!("starting postgres on {listen}"),
        Event::WaitingForServer { reason, waited } => {
            format!("waiting for the server ({}s): {reason}", waited.as_secs())
        }
        Event::ServerReady { after } => {
            format!("server ready after {:.1}s", after.as_secs_f64())
        }
        Event::OpeningTunnel { target, host, port } => {
            format!("opening the SSM tunnel through {target} to {host}:{port}")
        }
        Event::TunnelOpen { session } => format!("SSM session {session} open"),
        Event::EndedStaleSession { session, pid } => format!(
            "terminated SSM session {session} of a proxy that died (pid {pid}), with its database sessions"
        ),
        Event::LoggingIn { host, user } => format!("logging in to {host} as {user} (IAM)"),
        Event::WaitingForDatabase { waited, reason } => format!(
            "waiting for the database to resume… {}s ({reason})",
            waited.as_secs()
        ),
        other => format!("{other:?}"),
    }
}

fn ms(value: Option<f64>) -> String {
    value.map_or("-".into(), |v| format!("{v:.1} ms"))
}

/// The run summary's two lines.
pub fn summary(summary: &RunSummary) -> String {
    format!(
        "pgharness summary: {} tests used a database; pool: {} hits, {} misses; after the tests: \
         {} recycled, {} dropped, {} kept, {} pending{}\n\
         pgharness acquire: p50 {} p95 {} (from the pool: p50 {} p95 {}; created: p50 {} p95 {}); reset p50 {}",
        summary.tests,
        summary.claimed,
        summary.created,
        summary.recycled,
        summary.dropped,
        summary.kept,
        summary.pending,
        if summary.lost > 0 {
            format!(
                ", {} teardown(s) lost (finished later by a sweep)",
                summary.lost
            )
        } else {
            String::new()
        },
        ms(summary.acquire_p50_ms),
        ms(summary.acquire_p95_ms),
        ms(summary.claimed_p50_ms),
        ms(summary.claimed_p95_ms),
        ms(summary.created_p50_ms),
        ms(summary.created_p95_ms),
        ms(summary.reset_p50_ms),
    )
}

/// The line an event other than a step's is shown as (`None`: nothing to show).
pub fn line(event: &RunEvent) -> Option<String> {
    let said = |text: String| Some(format!("pgharness: {text}"));
    match event {
        RunEvent::Reaped { schemas } => {
            said(format!("reaped {schemas} schema(s) left by earlier runs"))
        }
        RunEvent::Budget {
            max_connections,
            rds_sessions,
            pool_size,
            threads,
        } => said(format!(
            "max_connections={max_connections}{}, pool_size={pool_size}: at most {threads} database tests at once",
            rds_sessions.map_or_else(String::new, |n| format!(", rds.max_sessions={n}"))
        )),
        RunEvent::LatencyBoundThreads { threads } => said(format!(
            "{threads} test threads (the tests wait on the link; `--test-threads N` to change)"
        )),
        RunEvent::PoolReady { ready, waited } => said(format!(
            "schema pool: {ready} ready before the first test (filled while the tests built, {:.1}s)",
            waited.as_secs_f64()
        )),
        RunEvent::NextestStarted => None,
        RunEvent::Interrupted => {
            said("interrupted; waiting for nextest to stop, then cleaning up".into())
        }
        RunEvent::ServerWentAway { kind, server } => said(format!(
            "the {kind} server ({server}) went away during the run: no summary (its ledger went with it); nextest's result stands"
        )),
        RunEvent::ProxyDied { pid, log } => said(format!(
            "the RDS proxy (pid {pid}) died during the run (its log: {log}); the next `cargo pgharness up --backend rds` or `down` ends the SSM session it left open"
        )),
        RunEvent::Summary(run) => Some(summary(run)),
        RunEvent::KeptSchema { schema, test, psql } => {
            Some(format!("  kept {schema} (test `{test}`): {psql}"))
        }
        RunEvent::TeardownFailed { test, outcome } => said(format!(
            "the teardown of test `{test}` failed on the server ({outcome}); its schema is left for `cargo pgharness reap` to recycle or drop"
        )),
        RunEvent::ServerKeptForSchemas { kind, idle_stop } => said(format!(
            "the {kind} server stays up for the kept schema(s){}; stop it with `cargo pgharness down`",
            idle_stop.map_or_else(String::new, |idle| format!(
                " (the native server stops by itself after {} without connections)",
                humantime::format_duration(idle)
            ))
        )),
        RunEvent::ServerStillShared { kind } => said(format!(
            "another `cargo pgharness test` is still using the {kind} server; the last run to end stops it"
        )),
        RunEvent::RdsDefaultSelection => said(
            "the rds backend runs the workspace without pgharness' own integration tests \
             (they need an admin on a server pgharness starts: `cargo pgharness test` runs them)"
                .into(),
        ),
        RunEvent::ProxyKeptForSchemas { emulated } => said(format!(
            "the RDS proxy{} stays up for the kept schema(s); stop with `cargo pgharness down`",
            if *emulated { " and the emulator" } else { "" }
        )),
        RunEvent::ProxyOfUpKept => said(
            "the RDS proxy of `cargo pgharness up` stays up; stop it with `cargo pgharness down`"
                .into(),
        ),
        RunEvent::ProxyRunning { pid } => said(format!("the RDS proxy already runs (pid {pid})")),
        RunEvent::EmulatorSessions {
            start_sessions,
            open,
        } => said(format!(
            "fake-aws saw {start_sessions} StartSession call(s) in this run; {open} of them open after down"
        )),
        RunEvent::Stopped(what) => said(format!("stopped {what}")),
        RunEvent::BuildingImage { tag, because } => said(format!(
            "{because}\npgharness: building {tag} from Debian packages instead (once)"
        )),
        RunEvent::Warning(text) => said(text.clone()),
        _ => None,
    }
}
