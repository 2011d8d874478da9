//! One metric family written label set by label set: the thin layer over
//! `prometheus-client`'s encoder that every family of the exposition uses.

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use crate::app::ProviderSnapshot;
use crate::metrics::Latency;

/// Reads one gauge from a provider's snapshot.
pub(super) type Read = fn(&ProviderSnapshot) -> f64;

pub(super) type Res = Result<(), std::fmt::Error>;

/// One metric family, written label set by label set.
pub(super) struct Family<'a> {
    enc: prometheus_client::encoding::MetricEncoder<'a>,
}

pub(super) fn family<'a>(
    enc: &'a mut DescriptorEncoder<'_>,
    name: &'a str,
    help: &str,
    ty: MetricType,
) -> Result<Family<'a>, std::fmt::Error> {
    Ok(Family {
        enc: enc.encode_descriptor(name, help, None, ty)?,
    })
}

impl Family<'_> {
    pub(super) fn counter<V>(&mut self, labels: &[(&str, &str)], v: V) -> Res
    where
        ConstCounter<V>: EncodeMetric,
    {
        ConstCounter::new(v).encode(self.enc.encode_family(&labels)?)
    }

    pub(super) fn gauge<V>(&mut self, labels: &[(&str, &str)], v: V) -> Res
    where
        ConstGauge<V>: EncodeMetric,
    {
        ConstGauge::new(v).encode(self.enc.encode_family(&labels)?)
    }

    pub(super) fn histogram(&mut self, labels: &[(&str, &str)], l: &Latency) -> Res {
        self.histogram_buckets(labels, l.sum_seconds(), l.count(), &l.buckets())
    }

    /// A histogram from its sum (seconds), count and per-bucket (not cumulative) counts.
    pub(super) fn histogram_buckets(
        &mut self,
        labels: &[(&str, &str)],
        sum: f64,
        count: u64,
        buckets: &[(f64, u64)],
    ) -> Res {
        self.enc
            .encode_family(&labels)?
            .encode_histogram::<NoLabelSet>(sum, count, buckets, None)
    }
}
