//! The mock's start-up settings (they are also the `mock-upstream` flags) and their
//! validation.

use std::net::SocketAddr;
use std::time::Duration;

use super::limit;
use super::tokens::TokenCharge;

/// Start-up settings of the simulated upstream.
#[derive(Debug, Clone, clap::Args)]
pub struct MockConfig {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// Requests a minute the provider allows (0: unlimited): at most rpm × window / 60
    /// (at least 1) in any rolling window. Changeable at run time with POST /mock/limit.
    #[arg(long, default_value_t = 40.0)]
    pub rpm: f64,
    /// Tokens a minute the provider allows (0: unlimited): at most tpm × window / 60 (at
    /// least 1) tokens charged in any rolling window, counted by the mock's own rule (see
    /// `src/mock/count.rs`). Changeable at run time with POST /mock/limit {"tpm": ...}.
    #[arg(long, default_value_t = 0.0)]
    pub tpm: f64,
    /// How a request's tokens are charged against --tpm: "reserved" admits a request
    /// only if it fits, "actual" while the window is below the limit.
    #[arg(long, value_enum, default_value_t = TokenCharge::Reserved)]
    pub token_charge: TokenCharge,
    /// Answer 400 to a request for MODEL whose body has stream_options, as some models
    /// do (per request: header x-mock-refuse-include-usage: 1). Repeatable.
    #[arg(long = "refuse-include-usage", value_name = "MODEL")]
    pub refuse_include_usage: Vec<String>,
    /// Seconds of the rolling window the limits apply to (they scale with it).
    #[arg(long, default_value_t = 60.0)]
    pub window_secs: f64,
    /// A model's own limit, MODEL=RPM, over the same window and on top of --rpm (which may
    /// be 0); requests whose JSON body names MODEL must pass both. Repeatable.
    #[arg(long = "model-limit", value_name = "MODEL=RPM")]
    pub model_limits: Vec<String>,
    /// At most N requests in flight per model, as NVIDIA's workers: past it, a 429 with
    /// NVIDIA's "Worker local total request limit reached (N/N)" body and no rate-limit
    /// headers. Such refusals do not count in the rolling windows.
    #[arg(long, value_name = "N")]
    pub worker_limit: Option<usize>,
    /// Record every request in the judge's log (GET /mock/windows) even with no limit set;
    /// it costs a lock per request. Any limit turns it on.
    #[arg(long)]
    pub judge: bool,
    /// Worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Milliseconds of simulated compute: before the response, or before a stream's first token.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Milliseconds before response headers are sent (slow headers).
    #[arg(long, default_value_t = 0)]
    pub header_delay_ms: u64,
    /// Milliseconds between streamed tokens.
    #[arg(long, default_value_t = 20)]
    pub token_delay_ms: u64,
    /// Tokens per completion.
    #[arg(long, default_value_t = 16)]
    pub tokens: usize,
    /// Fraction of requests answered with a 500 (0.0 to 1.0).
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    /// Reset streams after this many chunks.
    #[arg(long)]
    pub reset_after: Option<usize>,
    /// Leave out the x-ratelimit-* headers on admitted answers (only 429s carry them).
    #[arg(long)]
    pub no_quota_headers: bool,
    /// Send rate-limit headers in OpenAI's dialect, on admitted answers and 429s:
    /// x-ratelimit-limit-requests (per minute), -remaining-requests and -reset-requests
    /// (a Go duration such as "1s", "250ms", "6m0s": until the oldest admission leaves the
    /// rolling window) instead of bare x-ratelimit-limit/-remaining/-reset.
    #[arg(long)]
    pub openai_headers: bool,
    /// Send Retry-After on 429s as an HTTP date (IMF-fixdate, rounded up to the second)
    /// instead of seconds.
    #[arg(long)]
    pub retry_after_date: bool,
    /// Answer 429s as NVIDIA's hosted API does: body {"status":429,"title":"Too Many
    /// Requests"}, no Retry-After and no x-ratelimit-* headers (none on admitted answers
    /// either).
    #[arg(long = "bare-429")]
    pub no_headers_at_all: bool,
    /// Require this API key (401 otherwise).
    #[arg(long)]
    pub api_key: Option<String>,
    /// Keep the headers of the last 1000 requests for tests (`MockServer::seen`).
    #[arg(skip)]
    pub record_requests: bool,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            rpm: 0.0,
            tpm: 0.0,
            token_charge: TokenCharge::Reserved,
            refuse_include_usage: Vec::new(),
            window_secs: 60.0,
            workers: 1,
            latency_ms: 0,
            header_delay_ms: 0,
            token_delay_ms: 0,
            tokens: 16,
            error_rate: 0.0,
            reset_after: None,
            model_limits: Vec::new(),
            worker_limit: None,
            judge: false,
            no_quota_headers: false,
            openai_headers: false,
            retry_after_date: false,
            no_headers_at_all: false,
            api_key: None,
            record_requests: false,
        }
    }
}

/// Why the mock's start-up settings were refused.
#[derive(Debug, thiserror::Error)]
pub enum MockConfigError {
    #[error("--model-limit {given:?}: expected MODEL=RPM with RPM a number >= 0")]
    ModelLimit { given: String },
    #[error("--window-secs {given}: expected a number of seconds > 0")]
    Window { given: f64 },
    #[error("--tpm {given}: expected a number of tokens a minute >= 0 (0: unlimited)")]
    Tpm { given: f64 },
}

impl From<MockConfigError> for std::io::Error {
    fn from(e: MockConfigError) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, e)
    }
}

impl MockConfig {
    /// The rolling window (`window_secs`, clamped to 1 ms ..= 1 day).
    pub fn window(&self) -> Result<Duration, MockConfigError> {
        Duration::try_from_secs_f64(self.window_secs)
            .ok()
            .filter(|w| !w.is_zero())
            .map(limit::clamp_window)
            .ok_or(MockConfigError::Window {
                given: self.window_secs,
            })
    }

    /// `--tpm` as tokens per window (`None`: unlimited).
    pub fn token_max(&self) -> Result<Option<u64>, MockConfigError> {
        if !(self.tpm.is_finite() && self.tpm >= 0.0) {
            return Err(MockConfigError::Tpm { given: self.tpm });
        }
        Ok(limit::max_for(self.tpm, self.window()?).map(|m| m as u64))
    }

    /// `--model-limit` values as (model, admissions per window).
    pub fn parsed_model_limits(&self) -> Result<Vec<(String, Option<usize>)>, MockConfigError> {
        let window = self.window()?;
        self.model_limits
            .iter()
            .map(|given| {
                let bad = || MockConfigError::ModelLimit {
                    given: given.clone(),
                };
                let (model, rpm) = given.rsplit_once('=').ok_or_else(bad)?;
                let rpm: f64 = rpm.trim().parse().map_err(|_| bad())?;
                if model.is_empty() || !rpm.is_finite() || rpm < 0.0 {
                    return Err(bad());
                }
                Ok((model.to_owned(), limit::max_for(rpm, window)))
            })
            .collect()
    }
}
