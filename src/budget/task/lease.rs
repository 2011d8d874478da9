//! Leasing: asking for the tokens this replica will take over one lease time, putting
//! them in the pot, and giving back what is left when a lease ends or the limit falls.

use std::time::{Duration, Instant};

use super::{nanos, Lease, Task, HEARTBEAT};
use crate::budget::inputs::Settings;
use crate::limiter::PotLease;

impl Task {
    pub(super) fn low_water(&self) -> u32 {
        let steady = (self.rate.max(self.offered) * self.ttl.as_secs_f64()).ceil();
        (steady / 4.0) as u32
    }

    /// The lease in hand goes back (unused), with the next call.
    pub(super) fn drain_lease(&mut self) {
        let left = self.b.pot.drain();
        if let Some(l) = self.lease.take() {
            if left > 0 {
                self.give_back = Some((l.member, left));
                self.b.update(|v| v.leases.returned += u64::from(left));
            }
        }
    }

    /// Sends the request path wrote after their lease's time, to be counted again in
    /// the shared log from each send (in Redis time): a log entry counts for the window,
    /// the margin and a lease time after it, as long as the provider counts the send.
    pub(super) fn collect_late_sends(&mut self) {
        while let Some(at) = self.b.pot.next_late() {
            let at_ms = i64::try_from(at / 1_000_000).unwrap_or(i64::MAX) + self.offset_ms;
            self.late_sends.push(u64::try_from(at_ms).unwrap_or(0));
            self.b.update(|v| v.leases.late += 1);
        }
    }

    pub(super) async fn lease_call(
        &mut self,
        settings: &dyn Settings,
        want: u32,
        queued: usize,
        shares: bool,
    ) {
        if want > 0 {
            // What is left of the last lease goes back with this call.
            self.drain_lease();
        }
        // Offered per window plus those waiting now: in proportion to offered load for
        // open traffic, and converging to equal parts for clients that wait for each
        // answer before the next request (whose arrivals follow what they are served).
        let window = self.window().as_secs_f64();
        let demand = self.offered.max(self.rate) * window + queued as f64;
        let (member, n) = self.give_back.clone().unwrap_or_default();
        let mut args = vec![
            want.to_string(),
            format!("{demand:.3}"),
            queued.to_string(),
            member,
            n.to_string(),
            self.live.to_string(),
            if shares { "1" } else { "0" }.to_owned(),
        ];
        let late = self.late_sends.len();
        args.extend(self.late_sends.iter().map(u64::to_string));
        let sent = self.clock.now_nanos();
        let Some(r) = self.call(settings, "lease", &args).await else {
            return;
        };
        self.give_back = None;
        self.late_sends.drain(..late);
        tracing::debug!(
            provider = &*self.b.provider,
            want,
            granted = r.granted,
            wait_ms = r.wait.as_millis() as u64,
            limit = r.limit,
            live = r.live,
            learning = r.learning,
            "lease"
        );
        if want == 0 {
            return;
        }
        self.b.update(|v| match r.granted {
            0 => v.leases.empty += 1,
            g if g < want => v.leases.partial += 1,
            _ => v.leases.granted += 1,
        });
        if r.granted > 0 {
            // Usable from its start for 90% of the lease time, counted from before the
            // call (the grant was made after it).
            let start = sent.saturating_add(nanos(r.start_in));
            self.lease_number = self.lease_number.checked_add(1).unwrap_or(1);
            let lease = PotLease {
                number: self.lease_number,
                tokens: r.granted,
                not_before: start,
                expires: start.saturating_add(nanos(r.ttl.mul_f64(0.9))),
                // The grant counts the sends made within its lease time (the margin
                // after it is the network's, between this send and the provider's count).
                covers_until: start.saturating_add(nanos(r.ttl)),
            };
            // A token put back between the drain and now is lost to this replica; it
            // stays counted in the shared log until its lease time ends (safe).
            let _ = self.b.pot.fill(lease, self.low_water());
            self.lease = Some(Lease { member: r.member });
            self.limiter.wake_dispatcher();
        }
        if r.granted < want {
            // Never longer than a heartbeat: a wait for the window is only an estimate.
            self.retry_at = Instant::now() + r.wait.clamp(Duration::from_millis(1), HEARTBEAT);
        }
    }
}
