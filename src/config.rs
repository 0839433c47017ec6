//! The command-line settings several commands share: the store, expiries,
//! listings and `serve`'s server flags (each subcommand declares the rest
//! next to its code, in `cli/`). Every flag can also come from the
//! environment (upper case, `-` as `_`: `--port` / `PORT`); a flag on the
//! command line wins, as with the Go service's flagx.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::app::ListenAddress;
use crate::store::StoreSettings;

/// Where the Go service, and so every deployment manifest, keeps the key.
pub const DEFAULT_PRIVATE_KEY_PATH: &str = "/secrets/jwk-priv.json";
/// Datastore, as the Go programs use: a deployment that sets no store must
/// read the keys the Go tools wrote, not an empty local file.
pub const DEFAULT_STORE: &str = "datastore";
/// Variables read outside clap: by Google's client conventions, the log
/// filter, and Go's metrics address (see [`ServeArgs`]).
pub const OTHER_ENVIRONMENT: &[&str] = &[
    "DATASTORE_EMULATOR_HOST",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_CLOUD_QUOTA_PROJECT",
    "GCE_METADATA_HOST",
    "HOME",
    "RUST_LOG",
];

/// When a new key expires: in a while, at an instant, or never (neither).
#[derive(Debug, Clone, Default, Args)]
pub struct ExpiryArgs {
    /// The key expires this long from now (`90d`, `12h`).
    #[arg(long, value_parser = parse_duration, conflicts_with = "expires_at")]
    pub expires_in: Option<Duration>,
    /// The key expires at this instant (RFC 3339, such as `2027-01-31T00:00:00Z`).
    #[arg(long, value_parser = parse_instant)]
    pub expires_at: Option<time::OffsetDateTime>,
}

impl ExpiryArgs {
    /// The expiry these flags give; `None` when neither is set.
    pub fn expiry(&self) -> Result<Option<time::OffsetDateTime>, String> {
        let at = match (self.expires_in, self.expires_at) {
            (Some(d), _) => Some(from_now(d, true).map_err(|e| format!("--expires-in: {e}"))?),
            (None, at) => at,
        };
        // Whole seconds, as JWT times are: what is stored, printed and
        // put in `exp` is then the same instant.
        let at = at.map(|t| t.replace_nanosecond(0).unwrap_or(t));
        if at.is_some_and(|t| t <= time::OffsetDateTime::now_utc()) {
            return Err("the expiry is not in the future".into());
        }
        Ok(at)
    }
}

/// Shortest `--changes-poll-interval`: each poll is a store read (a billed
/// query on Datastore), so a tighter loop costs much and gains nothing.
pub const MIN_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// A `--changes-poll-interval`: a duration of at least [`MIN_POLL_INTERVAL`].
pub fn parse_poll_interval(text: &str) -> Result<Duration, String> {
    let interval = parse_duration(text)?;
    if interval < MIN_POLL_INTERVAL {
        return Err(format!(
            "{text:?} is too short: polls are store reads; use at least 100ms"
        ));
    }
    Ok(interval)
}

/// Now, moved `by` later (or earlier), as an instant the stores can keep
/// and print: RFC 3339 has years 0000 to 9999, and nothing is that far.
pub fn from_now(by: Duration, later: bool) -> Result<time::OffsetDateTime, String> {
    let too_far = || format!("{} is too far (past the year 9999)", humantime_like(by));
    let by = time::Duration::try_from(by).map_err(|_| too_far())?;
    let now = time::OffsetDateTime::now_utc();
    let at = if later {
        now.checked_add(by)
    } else {
        now.checked_sub(by)
    };
    at.filter(|t| (0..=9999).contains(&t.year())).ok_or_else(too_far)
}

/// A duration as a user typed it, roughly: whole days, else seconds.
fn humantime_like(d: Duration) -> String {
    match d.as_secs() {
        s if s >= 86_400 => format!("{}d", s / 86_400),
        s => format!("{s}s"),
    }
}

/// An RFC 3339 instant.
pub fn parse_instant(text: &str) -> Result<time::OffsetDateTime, String> {
    time::OffsetDateTime::parse(text.trim(), &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("{text:?} is not an RFC 3339 time like 2027-01-31T00:00:00Z: {e}"))
}

#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub store: StoreArgs,
}

/// Which store to use; shared by the server and every admin command, so
/// they all work on the same data. `Debug` shows where the store is, never
/// the URL itself, which may hold a password.
#[derive(Clone, Args)]
pub struct StoreArgs {
    /// The key store: `datastore` (Google Cloud Datastore, as the Go
    /// service), `sqlite:PATH` (an embedded database file) or
    /// `postgres://USER:PASSWORD@HOST:PORT/DB` [default: datastore; with
    /// `serve --dev`, a SQLite file in --data-dir].
    #[arg(long, env = "STORE", value_name = "URL")]
    pub store: Option<String>,
    /// Google Cloud project of the Datastore store.
    #[arg(long, env = "PROJECT_ID", default_value = "mlab-sandbox")]
    pub project_id: String,
    /// Datastore namespace of autojoin organizations and keys.
    #[arg(long, env = "PLATFORM_NS", default_value = "platform-credentials")]
    pub platform_ns: String,
    /// Datastore namespace of client integrations and their keys.
    #[arg(long, env = "CLIENT_INTEGRATION_NS", default_value = "client-integration")]
    pub client_integration_ns: String,
    /// Datastore namespace of the kinds only this service reads and writes
    /// (changes published for running servers); no Go program reads it.
    #[arg(
        long = "token-exchange-ns",
        env = "TOKEN_EXCHANGE_NS",
        default_value = "token-exchange"
    )]
    pub own_ns: String,
    /// Limit on each store call (e.g. `2s`, `500ms`); past it the request
    /// gets a 503. Datastore reads that fail transiently are retried once
    /// within the request; SQL stores rely on their connection pool.
    #[arg(long, env = "STORE_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub store_timeout: Duration,
    /// Most connections to PostgreSQL from this process.
    #[arg(long, env = "STORE_MAX_CONNECTIONS", default_value_t = crate::store::DEFAULT_PG_CONNECTIONS)]
    pub store_max_connections: u32,
}

impl std::fmt::Debug for StoreArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.settings().fmt(f)
    }
}

/// Who runs this process, for the audit log: the OS account it runs as
/// (from the kernel, not from `$USER`, which anyone can set), and, when
/// the store is Datastore reached with the service-account key file of
/// `GOOGLE_APPLICATION_CREDENTIALS`, that account (the principal Datastore
/// sees). Never a secret from that file.
pub fn operator(google_credentials: bool) -> String {
    let user = os_account();
    let account = google_credentials
        .then(|| std::env::var_os("GOOGLE_APPLICATION_CREDENTIALS"))
        .flatten()
        .and_then(|path| std::fs::read(path).ok())
        .and_then(|text| serde_json::from_slice::<serde_json::Value>(&text).ok())
        .filter(|v| v.get("type").and_then(serde_json::Value::as_str) == Some("service_account"))
        .and_then(|v| v.get("client_email")?.as_str().map(str::to_owned));
    match account {
        Some(account) => format!("{user} ({account})"),
        None => user,
    }
}

/// The name of the account this process runs as, or `uid N` when the
/// account has no name here (common in containers).
fn os_account() -> String {
    use std::os::unix::fs::MetadataExt as _;
    // /proc/self belongs to the process's effective user.
    let Ok(uid) = std::fs::metadata("/proc/self").map(|m| m.uid()) else {
        return "unknown user".to_owned();
    };
    let name = std::fs::read_to_string("/etc/passwd").ok().and_then(|passwd| {
        passwd.lines().find_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let _password = fields.next()?;
            (fields.next()?.parse::<u32>().ok()? == uid).then(|| name.to_owned())
        })
    });
    name.unwrap_or_else(|| format!("uid {uid}"))
}

impl StoreArgs {
    /// The store's settings these flags describe, defaults applied.
    pub fn settings(&self) -> StoreSettings {
        let mut settings = StoreSettings {
            url: self.store_url().to_owned(),
            project_id: self.project_id.clone(),
            platform_ns: self.platform_ns.clone(),
            client_integration_ns: self.client_integration_ns.clone(),
            own_ns: self.own_ns.clone(),
            timeout: self.store_timeout,
            operator: String::new(),
            max_connections: self.store_max_connections,
        };
        // Google credentials are in use only for Datastore itself, not its
        // emulator; `locate` is what decides which store this is.
        let google = matches!(
            crate::store::locate(&settings),
            Ok(crate::store::Location::Datastore { emulator: None, .. })
        );
        settings.operator = operator(google);
        settings
    }
}

impl From<&StoreArgs> for StoreSettings {
    fn from(args: &StoreArgs) -> Self {
        args.settings()
    }
}

/// Parses `500ms`, `2s`, `1m` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 500ms, 2s or 1m"))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86_400.0,
        other => return Err(format!("unknown unit {other:?}; use ms, s, m, h or d")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

impl StoreArgs {
    pub fn store_url(&self) -> &str {
        self.store.as_deref().unwrap_or(DEFAULT_STORE)
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Port of the HTTP API.
    #[arg(long, env = "PORT", default_value_t = 8080)]
    pub port: u16,
    /// Port of the Prometheus metrics listener (`/metrics`).
    #[arg(long, env = "METRICS_PORT", default_value_t = 9990)]
    pub metrics_port: u16,
    /// Address of the metrics listener, as the Go service's prometheusx
    /// takes it: `:9990` (every interface) or `HOST:PORT`. Wins over
    /// --metrics-port.
    #[arg(
        long = "prometheusx.listen-address",
        env = "PROMETHEUSX_LISTEN_ADDRESS",
        value_name = "ADDR",
        value_parser = ListenAddress::parse
    )]
    pub prometheusx_listen_address: Option<ListenAddress>,
    /// The private JWK that signs tokens [default: /secrets/jwk-priv.json].
    #[arg(long, env = "PRIVATE_KEY_PATH", value_name = "PATH")]
    pub private_key_path: Option<PathBuf>,
    /// A file of keys to publish in the JWKS without signing with them: the
    /// next key before it becomes active, the previous one until its tokens
    /// have expired. One JWK (private or public) or a JWK Set. Repeatable;
    /// the environment variable takes a comma-separated list.
    #[arg(long, env = "PUBLIC_KEY_PATH", value_name = "PATH", value_delimiter = ',')]
    pub public_key_path: Vec<PathBuf>,
    /// How often the key files are checked for changes (SIGHUP reloads at once).
    #[arg(long, env = "KEY_RELOAD_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub key_reload_interval: Duration,
    /// Zero-setup development mode: generate a signing key and demo API keys
    /// in --data-dir if missing, listen on 127.0.0.1 only, and print how to
    /// try the service. Not for production.
    #[arg(long, env = "DEV")]
    pub dev: bool,
    /// Where --dev keeps its signing key, database and demo keys.
    #[arg(long, env = "DATA_DIR", default_value = "token-exchange-dev", value_name = "DIR")]
    pub data_dir: PathBuf,
    #[command(flatten)]
    pub store: StoreArgs,
    /// How often the store is polled for changes published by admin
    /// commands (SQLite, Datastore; PostgreSQL pushes them, and checks an
    /// idle listener's connection this often). A revoked key is refused by
    /// every server within about this long (plus the poll). At least 100ms.
    #[arg(long, env = "CHANGES_POLL_INTERVAL", default_value = "1s", value_parser = parse_poll_interval)]
    pub changes_poll_interval: Duration,
    /// How often each key's last use and token count are written to the
    /// store (one batch for all keys used since).
    #[arg(long, env = "USAGE_FLUSH_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub usage_flush_interval: Duration,
    /// How long a valid key is trusted without asking the store again: the
    /// longest a revoked key keeps working when the change is not published
    /// (another program wrote it) or the change feed is down. `0` disables
    /// the cache.
    #[arg(long, env = "KEY_CACHE_TTL", default_value = "30s", value_parser = parse_duration)]
    pub key_cache_ttl: Duration,
    /// How long an unknown, inactive or wrong key is refused without asking
    /// the store again.
    #[arg(long, env = "NEGATIVE_CACHE_TTL", default_value = "5s", value_parser = parse_duration)]
    pub negative_cache_ttl: Duration,
    /// Most keys cached (valid and refused together); least recently used
    /// go first.
    #[arg(long, env = "KEY_CACHE_SIZE", default_value_t = crate::cache::DEFAULT_CAPACITY)]
    pub key_cache_size: usize,
    /// While the store fails, a valid key whose cache entry expired less
    /// than this long ago still gets tokens.
    #[arg(long, env = "STALE_IF_ERROR", default_value = "10m", value_parser = parse_duration)]
    pub stale_if_error: Duration,
    /// Deadline of one request; past it the answer is 503.
    #[arg(long, env = "REQUEST_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// Requests handled at once; more are refused with 503 instead of
    /// queueing [default: 256 per CPU].
    #[arg(long, env = "MAX_IN_FLIGHT", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight: Option<u32>,
    /// Time a client has to send its request headers; slower connections
    /// are closed.
    #[arg(long, env = "HEADER_READ_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,
    /// Time a client has to send its request body once the headers are in;
    /// slower requests get 408. The body is read before the request counts
    /// against --max-in-flight.
    #[arg(long, env = "BODY_READ_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub body_read_timeout: Duration,
    /// Open connections at most; beyond it new connections wait in the
    /// kernel's backlog until one closes.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = crate::http::DEFAULT_MAX_CONNECTIONS as u32,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Limits on tokens per integration key, by the key's tier:
    /// `TIER=RATE,...` with RATE like `2/s:burst=20` (units s, m, h, d;
    /// the burst defaults to the count) or `unlimited`; tier `*` covers the
    /// tiers not listed. Over the limit the answer is 429. Off by default.
    #[arg(long, env = "TIER_RATE_LIMITS", value_name = "LIMITS",
          value_parser = crate::rate_limit::TierLimits::parse)]
    pub tier_rate_limits: Option<crate::rate_limit::TierLimits>,
    /// Limit on tokens per integration, all its keys together (a RATE as
    /// in --tier-rate-limits). Off by default.
    #[arg(long, env = "INTEGRATION_RATE_LIMIT", value_name = "RATE",
          value_parser = crate::rate_limit::Rate::parse)]
    pub integration_rate_limit: Option<crate::rate_limit::Rate>,
    /// Limit on autojoin tokens per organization, all its keys together.
    /// Off by default.
    #[arg(long, env = "AUTOJOIN_RATE_LIMIT", value_name = "RATE",
          value_parser = crate::rate_limit::Rate::parse)]
    pub autojoin_rate_limit: Option<crate::rate_limit::Rate>,
}

impl ServeArgs {
    /// The service settings these flags describe.
    pub fn settings(&self) -> crate::http::Settings {
        crate::http::Settings {
            store_timeout: self.store.store_timeout,
            cache: crate::cache::CacheSettings {
                ttl: self.key_cache_ttl,
                negative_ttl: self.negative_cache_ttl,
                capacity: self.key_cache_size,
                stale_if_error: self.stale_if_error,
            },
            request_timeout: self.request_timeout,
            max_in_flight: self
                .max_in_flight
                .map_or_else(crate::http::default_max_in_flight, |n| n as usize),
            header_read_timeout: self.header_read_timeout,
            body_read_timeout: self.body_read_timeout,
            max_connections: self.max_connections as usize,
            rate_limits: crate::rate_limit::RateLimitSettings {
                tiers: self.tier_rate_limits.clone().unwrap_or_default(),
                integration: self.integration_rate_limit,
                autojoin: self.autojoin_rate_limit,
            },
            ..crate::http::Settings::default()
        }
    }

    /// Production listens on every interface, IPv6 and IPv4, as the Go
    /// service does; the development mode only on loopback, since its keys
    /// are not secret.
    pub fn listen_addr(&self) -> ListenAddress {
        self.on_port(self.port)
    }

    pub fn metrics_addr(&self) -> ListenAddress {
        match &self.prometheusx_listen_address {
            Some(ListenAddress::Everywhere(port)) => self.on_port(*port),
            Some(exact) => exact.clone(),
            None => self.on_port(self.metrics_port),
        }
    }

    fn on_port(&self, port: u16) -> ListenAddress {
        if self.dev {
            ListenAddress::Exact(format!("127.0.0.1:{port}"))
        } else {
            ListenAddress::Everywhere(port)
        }
    }
}

/// A command that only reads a list.
#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub store: StoreArgs,
}

/// A new expiry: one of --expires-in, --expires-at or --never.
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false, id = "new_expiry")]
pub struct NewExpiryArgs {
    /// The key expires this long from now (`90d`, `12h`).
    #[arg(long, value_parser = parse_duration)]
    pub expires_in: Option<Duration>,
    /// The key expires at this instant (RFC 3339).
    #[arg(long, value_parser = parse_instant)]
    pub expires_at: Option<time::OffsetDateTime>,
    /// The key never expires.
    #[arg(long)]
    pub never: bool,
}

impl NewExpiryArgs {
    pub fn expiry(&self) -> Result<Option<time::OffsetDateTime>, String> {
        ExpiryArgs {
            expires_in: self.expires_in,
            expires_at: self.expires_at,
        }
        .expiry()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiries_are_whole_seconds_in_the_future() {
        let none = ExpiryArgs::default();
        assert_eq!(none.expiry().unwrap(), None);
        let later = ExpiryArgs {
            expires_in: Some(Duration::from_secs(90 * 86_400)),
            expires_at: None,
        };
        let at = later.expiry().unwrap().unwrap();
        assert_eq!(at.nanosecond(), 0);
        let expected = time::OffsetDateTime::now_utc() + time::Duration::days(90);
        assert!((expected - at).abs() < time::Duration::seconds(5));
        let past = ExpiryArgs {
            expires_in: None,
            expires_at: Some(parse_instant("2001-01-01T00:00:00Z").unwrap()),
        };
        assert!(past.expiry().unwrap_err().contains("not in the future"));
        assert!(parse_instant("tomorrow").is_err());
        assert_eq!(parse_duration("30d").unwrap(), Duration::from_secs(30 * 86_400));
    }
    #[test]
    fn durations() {
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("2 weeks").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
