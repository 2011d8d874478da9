//! Command line: parse arguments, load configuration, start, wait for a signal, drain.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use nvidia_sidecar::admin;
use nvidia_sidecar::config::{self, Config, ProcessEnv, Settings};
use nvidia_sidecar::{app::App, demo, logging, mock, server};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "nvidia-sidecar",
    version,
    about = "Rate-limiting sidecar proxy that paces traffic to OpenAI-compatible LLM APIs"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML configuration file (providers, routes, settings).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: Settings,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar (the default).
    Run,
    /// Run the simulated OpenAI-compatible upstream.
    MockUpstream(mock::MockConfig),
    /// Simulated upstream + sidecar + synthetic client; needs no key and no network.
    Demo(demo::DemoArgs),
    /// Print every setting (variable, flag, default, meaning) as a Markdown table.
    Settings,
}

/// `SIDECAR_*` variables set, each with where: the environment or `.env`.
type Variables = Vec<(String, &'static str)>;

/// The configuration, and the `SIDECAR_*` variables set (to warn about those no setting
/// reads once logging runs).
fn load(cli: &Cli) -> Result<(Config, Variables), ExitCode> {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let loaded = ProcessEnv::with_dotenv(&cwd).and_then(|env| {
        let config = config::load(cli.config.as_deref(), &env, cli.settings.clone())?;
        Ok((config, env.sidecar_names()))
    });
    loaded.map_err(|e| {
        eprintln!("nvidia-sidecar: {e}");
        ExitCode::from(2)
    })
}

/// One warning per `SIDECAR_*` variable that no setting reads, naming the closest one.
fn warn_unknown_variables(names: &[(String, &'static str)]) {
    for (name, from) in names {
        if let Some((name, closest)) = config::unknown_variable(name) {
            match closest {
                Some(c) => {
                    tracing::warn!(variable = %name, set_in = from, did_you_mean = c, "unknown variable, ignored")
                }
                None => {
                    tracing::warn!(variable = %name, set_in = from, "unknown variable, ignored (`nvidia-sidecar settings` lists them all)")
                }
            }
        }
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Waits for SIGTERM or SIGINT; on each SIGHUP re-reads the file and environment and
/// applies the run-time settings (a bad file keeps the running configuration).
async fn serve_signals(cli: &Cli, app: &App) {
    use tokio::signal::unix::{signal as unix_signal, SignalKind};
    let Ok(mut hup) = unix_signal(SignalKind::hangup()) else {
        return signal().await;
    };
    let stop = signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = hup.recv() => reload(cli, app),
        }
    }
}

fn reload(cli: &Cli, app: &App) {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let loaded = ProcessEnv::with_dotenv(&cwd)
        .and_then(|env| config::load(cli.config.as_deref(), &env, cli.settings.clone()));
    match loaded {
        Err(e) => tracing::error!(error = %e, "reload failed: the running configuration is kept"),
        Ok(config) => match admin::reload(app, &config) {
            Ok(changes) => tracing::info!(changed = changes.len(), "reloaded the configuration"),
            Err(e) => {
                tracing::error!(error = %e, "reload refused: the running configuration is kept")
            }
        },
    }
}

async fn signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    if matches!(cli.command, Some(Command::Settings)) {
        print!("{}", config::markdown_table());
        return ExitCode::SUCCESS;
    }
    let (config, variables) = match load(&cli) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // The guard is held to the end of main: dropping it flushes the log.
    let (level_handle, _log_guard) = match logging::init(config.log_level, config.log_format) {
        Ok((handle, guard)) => (Some(handle), Some(guard)),
        Err(e) => {
            eprintln!("nvidia-sidecar: cannot start logging: {e}");
            (None, None)
        }
    };
    warn_unknown_variables(&variables);
    for (flag, instead) in config::secret_flags(&cli.settings) {
        tracing::warn!(
            flag,
            instead,
            "a secret given as a command-line flag is visible to other users of this machine (ps, /proc); use a file or the environment instead"
        );
    }
    let Ok(rt) = runtime() else {
        eprintln!("nvidia-sidecar: cannot start the runtime");
        return ExitCode::FAILURE;
    };
    match cli.command.take().unwrap_or(Command::Run) {
        Command::Run => {
            let app = App::new(config);
            if let Some(h) = level_handle {
                let _ = app.log_level.set(h);
            }
            let running = match server::start_proxy(app.clone()) {
                Ok(r) => r,
                Err(e) => {
                    // Name the settings that made the address, as the user wrote them.
                    let named: Vec<String> = e
                        .listener
                        .settings()
                        .iter()
                        .map(|key| {
                            let (name, at) = app.config.origins.name(key);
                            format!("{name}{at}")
                        })
                        .collect();
                    eprintln!("nvidia-sidecar: {e} (set by {})", named.join(" and "));
                    return ExitCode::FAILURE;
                }
            };
            tracing::info!(
                listen = %running.local_addr,
                workers = app.config.workers.get(),
                providers = app.providers.len(),
                "nvidia-sidecar listening"
            );
            for p in &app.providers {
                tracing::info!(
                    provider = &*p.name,
                    upstream = %p.config.upstream.display(),
                    api_key = p.config.api_key.as_ref().map_or_else(|| "none (the client's passes through)".to_owned(), |k| k.masked()),
                    rate_rpm = p.config.rate_rpm,
                    window_secs = p.config.window.as_secs_f64(),
                    models = p.config.models.join(","),
                    "provider"
                );
            }
            match running.metrics_addr {
                Some(addr) => tracing::info!(metrics = %addr, "metrics listening"),
                None => tracing::info!("metrics listener off"),
            }
            let budgets = match nvidia_sidecar::budget::Runner::spawn(&app) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("nvidia-sidecar: cannot start the shared budget thread: {e}");
                    return ExitCode::FAILURE;
                }
            };
            if let Some(redis) = &app.config.redis {
                tracing::info!(
                    redis = redis.url.masked(),
                    prefix = %redis.prefix,
                    budgets = app.providers.iter().map(|p| p.config.budget.as_str()).collect::<Vec<_>>().join(","),
                    "shared budget: pacing with the other replicas through Redis"
                );
            }
            match &app.admin {
                mode if mode.is_off() => {
                    tracing::warn!(admin = app.admin.describe(), "admin API is off")
                }
                mode => tracing::info!(admin = mode.describe(), "admin API"),
            }
            rt.block_on(serve_signals(&cli, &app));
            tracing::info!(
                grace_secs = app.config.timeouts.shutdown_grace.as_secs_f64(),
                "shutting down: draining connections"
            );
            running.stop();
            if let Some(b) = budgets {
                b.stop();
            }
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Command::MockUpstream(mc) => {
            let server = match mock::MockServer::start(mc) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("nvidia-sidecar: cannot start the simulated upstream: {e}");
                    return ExitCode::FAILURE;
                }
            };
            tracing::info!(base_url = %server.base_url(), "simulated upstream listening");
            println!("simulated upstream listening on {}", server.base_url());
            rt.block_on(signal());
            server.stop();
            ExitCode::SUCCESS
        }
        Command::Settings => ExitCode::SUCCESS,
        Command::Demo(args) => {
            let local = tokio::task::LocalSet::new();
            match local.block_on(&rt, demo::run(config, args, signal())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("nvidia-sidecar: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
