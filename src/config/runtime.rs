//! The run-time fields: the settings an operator may change while the sidecar runs
//! (the admin API, a SIGHUP reload), listed once.
//!
//! `run_time_fields!` expands the table at the end of this file into everything that
//! names these fields, so none can drift from another: the rows ([`ROWS`], [`FIELDS`]:
//! name, scope, range with both bounds, how a change applies), the values ([`Hot`],
//! [`HotProvider`]), a change as the admin API reads it ([`Patch`]) with its checks, the
//! JSON of each value for the admin view and the audit, and the copy of the values
//! between a [`Config`] and a [`Hot`]. The configuration checks the same fields against
//! the same rows ([`Field::configured`]), so the admin API accepts exactly what the
//! configuration accepts.
//!
//! A setting that is not in the table needs a restart: [`super::restart`] compares
//! everything else.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::time::Duration;

use serde_json::{json, Value};

use super::error::ConfigError;
use super::typed::{Config, ProviderConfig};
use super::validate::{Range, SECONDS};

/// Where a run-time field lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Each provider has its own; the top-level value is the default and a change to it
    /// applies to every provider.
    Provider,
    /// One for the whole sidecar.
    Global,
}

/// How a new value reaches the running sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applies {
    /// Into the provider's limiter at once; the bucket keeps its tokens.
    Limiter,
    /// The provider's queue bound: a smaller one refuses new arrivals until the depth
    /// falls under it, dropping nobody.
    QueueBound,
    /// Each request reads it once, as it arrives.
    PerRequest,
    /// Into the provider's token budget. Nothing holds one yet (issue 19): until it
    /// does, the value lives in the run-time settings alone.
    TokenBudget,
    /// The log filter, at once.
    LogFilter,
}

/// One row of the table.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Field {
    /// The setting's key, also its name in the admin API.
    pub name: &'static str,
    pub scope: Scope,
    /// What it accepts; its type follows (a number, `true`/`false`, a level).
    pub range: Range,
    pub applies: Applies,
}

/// A value a row does not accept: the field (as the patch names it), what is wrong
/// with the value and what the row accepts.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    pub field: String,
    pub problem: String,
    pub accepted: String,
}

impl Field {
    /// The value `given` stands for, checked against this row; `prefix` (such as
    /// `providers.nvidia.`) names the field in a refusal.
    pub fn take<T: Live>(&self, prefix: &str, given: &T::Given) -> Result<T, Refused> {
        T::from_given(given, &self.range).ok_or_else(|| Refused {
            field: format!("{prefix}{}", self.name),
            problem: T::refusal(given),
            accepted: self.range.accepted(),
        })
    }

    /// The configured value `given` (written as `shown`), checked against this row; the
    /// error names `setting` (such as `providers[0].rate_rpm`).
    pub fn configured<T: Live>(
        &self,
        setting: &str,
        given: &T::Given,
        shown: impl Display,
    ) -> Result<T, ConfigError> {
        T::from_given(given, &self.range)
            .ok_or_else(|| ConfigError::invalid(setting, shown, &self.range.expected()))
    }
}

/// The type of a run-time value: how it is given and how it is shown.
pub trait Live: Copy + PartialEq {
    /// The value as the admin API's JSON gives it.
    type Given;
    /// The value `given` stands for, when `range` accepts it.
    fn from_given(given: &Self::Given, range: &Range) -> Option<Self>;
    /// Why `given` was refused, in a few words.
    fn refusal(given: &Self::Given) -> String;
    /// As the admin view and the audit show it.
    fn json(self) -> Value;
}

fn out_of_range(given: &f64) -> String {
    format!("{given} is out of range")
}

impl Live for f64 {
    type Given = f64;
    fn from_given(given: &f64, range: &Range) -> Option<Self> {
        range.admits(*given).then_some(*given)
    }
    fn refusal(given: &f64) -> String {
        out_of_range(given)
    }
    fn json(self) -> Value {
        json!(self)
    }
}

macro_rules! live_count {
    ($($t:ty),*) => {$(
        impl Live for $t {
            type Given = f64;
            fn from_given(given: &f64, range: &Range) -> Option<Self> {
                // In range: an integer that fits in u64; the row's bound, in the type.
                range.admits(*given).then(|| <$t>::try_from(*given as u64).ok()).flatten()
            }
            fn refusal(given: &f64) -> String {
                out_of_range(given)
            }
            fn json(self) -> Value {
                json!(self)
            }
        }
    )*};
}
live_count!(u32, usize);

impl Live for u64 {
    type Given = f64;
    fn from_given(given: &f64, range: &Range) -> Option<Self> {
        // In range: an integer, and the row's bound keeps it exact in an f64.
        range.admits(*given).then_some(*given as u64)
    }
    fn refusal(given: &f64) -> String {
        out_of_range(given)
    }
    fn json(self) -> Value {
        json!(self)
    }
}

impl Live for Duration {
    type Given = f64;
    fn from_given(given: &f64, range: &Range) -> Option<Self> {
        range
            .admits(*given)
            .then(|| Duration::try_from_secs_f64(*given).ok())
            .flatten()
    }
    fn refusal(given: &f64) -> String {
        out_of_range(given)
    }
    fn json(self) -> Value {
        json!(self.as_secs_f64())
    }
}

impl Live for bool {
    type Given = bool;
    fn from_given(given: &bool, range: &Range) -> Option<Self> {
        (*range == Range::Switch).then_some(*given)
    }
    fn refusal(given: &bool) -> String {
        format!("{given} is out of range")
    }
    fn json(self) -> Value {
        json!(self)
    }
}

impl Live for tracing::Level {
    type Given = String;
    fn from_given(given: &String, range: &Range) -> Option<Self> {
        (*range == Range::Level)
            .then(|| given.trim().parse().ok())
            .flatten()
    }
    fn refusal(given: &String) -> String {
        format!(
            "{:?} is not a level",
            given.chars().take(40).collect::<String>()
        )
    }
    fn json(self) -> Value {
        json!(self.as_str().to_ascii_lowercase())
    }
}

/// The names of the fields in `scope` (all with `None`), in the table's order.
pub fn names(scope: Option<Scope>) -> Vec<&'static str> {
    FIELDS
        .iter()
        .filter(|f| scope.is_none_or(|s| f.scope == s))
        .map(|f| f.name)
        .collect()
}

/// The row of the field `name`.
pub fn field(name: &str) -> Option<&'static Field> {
    FIELDS.iter().find(|f| f.name == name)
}

/// Expands the table into its rows, the value and patch types and their methods. Each
/// provider field is a member of [`ProviderConfig`] of the same name; each global one
/// names where it is in [`Config`] (`at timeouts.request`).
macro_rules! run_time_fields {
    (
        provider {
            $( $(#[doc = $pdoc:literal])+
               $p:ident : $pt:ty = $prange:expr, $papplies:ident; )+
        }
        global {
            $( $(#[doc = $gdoc:literal])+
               $g:ident : $gt:ty = $grange:expr, $gapplies:ident, at $($gat:ident).+; )+
        }
    ) => {
        /// Every row, by field name.
        #[derive(Debug, Clone, Copy)]
        pub struct Rows {
            $( pub $p: Field, )+
            $( pub $g: Field, )+
        }

        /// The table.
        pub const ROWS: Rows = Rows {
            $( $p: Field {
                name: stringify!($p),
                scope: Scope::Provider,
                range: $prange,
                applies: Applies::$papplies,
            }, )+
            $( $g: Field {
                name: stringify!($g),
                scope: Scope::Global,
                range: $grange,
                applies: Applies::$gapplies,
            }, )+
        };

        /// Every row: the provider fields, then the global ones.
        pub const FIELDS: &[Field] = &[ $( ROWS.$p, )+ $( ROWS.$g, )+ ];

        /// The per-provider settings that can change at run time.
        #[derive(Debug, Clone, Copy, PartialEq)]
        pub struct HotProvider {
            $( $(#[doc = $pdoc])+ pub $p: $pt, )+
        }

        /// One version of the run-time settings.
        #[derive(Debug, Clone, PartialEq)]
        pub struct Hot {
            /// Starts at 1; each applied change adds one.
            pub version: u64,
            $( $(#[doc = $gdoc])+ pub $g: $gt, )+
            /// The global defaults, as last set (a global change applies to every
            /// provider).
            pub defaults: HotProvider,
            /// By provider index.
            pub providers: Vec<HotProvider>,
        }

        /// Fields a patch may set for every provider (top level) or for one.
        #[derive(Debug, Default, Clone, PartialEq, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct ProviderPatch {
            $( pub $p: Option<<$pt as Live>::Given>, )+
        }

        /// A change to the run-time settings. Top-level provider fields apply to every
        /// provider (and become the global defaults); `providers.<name>` fields win for
        /// that provider.
        #[derive(Debug, Default, Clone, PartialEq, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct Patch {
            $( pub $p: Option<<$pt as Live>::Given>, )+
            $( pub $g: Option<<$gt as Live>::Given>, )+
            pub providers: Option<BTreeMap<String, ProviderPatch>>,
        }

        impl HotProvider {
            /// The configured values of provider `p`.
            pub fn of(p: &ProviderConfig) -> Self {
                Self { $( $p: p.$p, )+ }
            }

            /// Writes these values into `p`.
            pub fn write_into(&self, p: &mut ProviderConfig) {
                $( p.$p = self.$p; )+
            }

            /// Sets each field `patch` gives, checked against its row; `prefix` names the
            /// fields in a refusal. After a refusal `self` may be changed in part.
            pub fn patch(&mut self, prefix: &str, patch: &ProviderPatch) -> Result<(), Refused> {
                $( if let Some(given) = &patch.$p {
                    self.$p = ROWS.$p.take(prefix, given)?;
                } )+
                Ok(())
            }

            /// Each field's name and value as the admin view and the audit show it.
            pub fn shown(&self) -> Vec<(&'static str, Value)> {
                vec![ $( (ROWS.$p.name, Live::json(self.$p)), )+ ]
            }

            /// Whether a field that applies `how` differs between `self` and `other`.
            pub fn differs(&self, other: &Self, how: Applies) -> bool {
                false $( || (ROWS.$p.applies == how && self.$p != other.$p) )+
            }
        }

        impl Hot {
            /// The configured values. The global defaults start as the default
            /// provider's.
            pub fn of(config: &Config) -> Self {
                Self {
                    version: 1,
                    $( $g: config.$($gat).+, )+
                    defaults: HotProvider::of(config.default_provider()),
                    providers: config.providers.iter().map(HotProvider::of).collect(),
                }
            }

            /// Writes these values into `config` (the defaults have no place there).
            pub fn write_into(&self, config: &mut Config) {
                $( config.$($gat).+ = self.$g; )+
                for (p, h) in config.providers.iter_mut().zip(&self.providers) {
                    h.write_into(p);
                }
            }

            /// Sets each global field `patch` gives, checked against its row.
            pub fn patch_global(&mut self, patch: &Patch) -> Result<(), Refused> {
                $( if let Some(given) = &patch.$g {
                    self.$g = ROWS.$g.take("", given)?;
                } )+
                Ok(())
            }

            /// Each global field's name and value as the admin view and the audit show it.
            pub fn shown(&self) -> Vec<(&'static str, Value)> {
                vec![ $( (ROWS.$g.name, Live::json(self.$g)), )+ ]
            }

            /// Whether a global field that applies `how` differs between `self` and
            /// `other`.
            pub fn differs(&self, other: &Self, how: Applies) -> bool {
                false $( || (ROWS.$g.applies == how && self.$g != other.$g) )+
            }
        }

        impl ProviderPatch {
            /// Whether it sets no field.
            pub fn is_empty(&self) -> bool {
                true $( && self.$p.is_none() )+
            }
        }

        impl Patch {
            /// The top-level provider fields: a change to every provider.
            pub fn all(&self) -> ProviderPatch {
                ProviderPatch { $( $p: self.$p.clone(), )+ }
            }

            /// Whether it sets no field (an empty `providers.<name>` sets none).
            pub fn is_empty(&self) -> bool {
                self.all().is_empty()
                    $( && self.$g.is_none() )+
                    && self
                        .providers
                        .iter()
                        .flat_map(|m| m.values())
                        .all(ProviderPatch::is_empty)
            }
        }
    };
}

run_time_fields! {
    provider {
        /// Requests per minute at most: the ceiling the provider is paced under.
        rate_rpm: f64 = Range::Rate { max: 6_000_000.0 }, Limiter;
        /// The largest burst admitted after an idle period.
        bucket_capacity: u32 = Range::Integer { min: 1, max: 1_000_000 }, Limiter;
        /// Most requests waiting for a token, all priorities together.
        queue_max_size: usize = Range::Integer { min: 0, max: 1_000_000 }, QueueBound;
        /// How long a low-priority request may wait in the queue.
        low_priority_timeout: Duration = SECONDS, PerRequest;
        /// Tokens per minute the provider allows; 0: no token budget.
        tokens_per_minute: u64 = Range::Integer { min: 0, max: 10_000_000_000 }, TokenBudget;
    }
    global {
        /// Arrival to response headers, queue wait included.
        request_timeout: Duration = SECONDS, PerRequest, at timeouts.request;
        /// Requests the queue cannot take go to the fallback (or unmetered).
        fallback_enabled_passthrough: bool = Range::Switch, PerRequest,
            at fallback_enabled_passthrough;
        /// The level of the logs.
        log_level: tracing::Level = Range::Level, LogFilter, at log_level;
    }
}

#[cfg(test)]
mod tests;
