//! Token-bucket I/O limits for a device: bytes per second and operations per
//! second, each with a burst. A device asks before each request; when a
//! bucket is empty it stops serving and a timerfd wakes it when enough tokens
//! have come back.

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};
use vmm_sys_util::timerfd::TimerFd;

/// Limits of a disk or of each direction of a NIC; absent means unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(default, deny_unknown_fields)]
pub struct RateLimit {
    /// Bytes per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schema(minimum = 1))]
    pub bytes_per_sec: Option<u64>,
    /// Bytes that may pass at once after a quiet period (default: one second's worth).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schema(minimum = 1))]
    pub bytes_burst: Option<u64>,
    /// Requests (disk) or packets (NIC) per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schema(minimum = 1))]
    pub ops_per_sec: Option<u64>,
    /// Operations that may pass at once after a quiet period.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schema(minimum = 1))]
    pub ops_burst: Option<u64>,
}

impl RateLimit {
    pub fn is_unlimited(&self) -> bool {
        self.bytes_per_sec.is_none() && self.ops_per_sec.is_none()
    }

    /// Whether these limits can be enforced: every number positive (a rate
    /// of 0 would stop the device for good), a burst only with its rate.
    /// The error names the field.
    pub fn check(&self) -> Result<(), String> {
        let fields = [
            ("bytes_per_sec", self.bytes_per_sec),
            ("bytes_burst", self.bytes_burst),
            ("ops_per_sec", self.ops_per_sec),
            ("ops_burst", self.ops_burst),
        ];
        if let Some((name, _)) = fields.iter().find(|(_, value)| *value == Some(0)) {
            return Err(format!("{name} must be at least 1"));
        }
        if self.bytes_burst.is_some() && self.bytes_per_sec.is_none() {
            return Err("bytes_burst needs bytes_per_sec".into());
        }
        if self.ops_burst.is_some() && self.ops_per_sec.is_none() {
            return Err("ops_burst needs ops_per_sec".into());
        }
        Ok(())
    }
}

/// One bucket: `rate` tokens per second up to `capacity`. A request larger
/// than the whole bucket passes when the bucket is full and leaves it in
/// debt, so no request size can stall forever.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: u64,
    capacity: u64,
    /// Tokens now; negative while in debt.
    tokens: i128,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: u64, capacity: u64, now: Instant) -> Self {
        let capacity = capacity.max(1);
        TokenBucket {
            rate: rate.max(1),
            capacity,
            tokens: i128::from(capacity),
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last);
        let new = elapsed.as_nanos() as i128 * i128::from(self.rate) / 1_000_000_000;
        if new > 0 {
            self.tokens = (self.tokens + new).min(i128::from(self.capacity));
            // Keep the remainder of a partial token for next time.
            let used = Duration::from_nanos((new * 1_000_000_000 / i128::from(self.rate)) as u64);
            self.last += used;
        }
        // A full bucket banks no time towards its next token.
        if self.tokens == i128::from(self.capacity) {
            self.last = now;
        }
    }

    /// Whether `n` tokens may be taken at `now`.
    fn can_take(&mut self, n: u64, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= i128::from(n.min(self.capacity))
    }

    fn take(&mut self, n: u64) {
        self.tokens -= i128::from(n);
    }

    /// How long until `n` tokens (at most a full bucket) are there.
    fn wait_for(&self, n: u64) -> Duration {
        let missing = i128::from(n.min(self.capacity)) - self.tokens;
        if missing <= 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos((missing * 1_000_000_000 / i128::from(self.rate)) as u64 + 1)
    }
}

/// A device's limiter: both buckets, and the timer that ends a throttle.
pub struct RateLimiter {
    bytes: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    throttled: bool,
    /// Requests that had to wait, for reports.
    pub throttled_count: u64,
}

impl RateLimiter {
    pub fn new(limit: &RateLimit) -> std::io::Result<Self> {
        let now = Instant::now();
        let bucket = |rate: Option<u64>, burst: Option<u64>| {
            rate.map(|rate| TokenBucket::new(rate, burst.unwrap_or(rate), now))
        };
        Ok(RateLimiter {
            bytes: bucket(limit.bytes_per_sec, limit.bytes_burst),
            ops: bucket(limit.ops_per_sec, limit.ops_burst),
            timer: TimerFd::new()?,
            throttled: false,
            throttled_count: 0,
        })
    }

    /// Takes one operation of `bytes`, or, when a bucket is short, takes
    /// nothing, arms the timer and returns false: the device must stop until
    /// [`RateLimiter::timer_fired`].
    pub fn consume(&mut self, bytes: u64) -> bool {
        self.consume_at(bytes, Instant::now())
    }

    pub fn consume_at(&mut self, bytes: u64, now: Instant) -> bool {
        let bytes_ok = self.bytes.as_mut().is_none_or(|b| b.can_take(bytes, now));
        let ops_ok = self.ops.as_mut().is_none_or(|b| b.can_take(1, now));
        if bytes_ok && ops_ok {
            if let Some(bucket) = &mut self.bytes {
                bucket.take(bytes);
            }
            if let Some(bucket) = &mut self.ops {
                bucket.take(1);
            }
            return true;
        }
        let wait = [
            self.bytes.as_ref().map(|b| b.wait_for(bytes)),
            self.ops.as_ref().map(|b| b.wait_for(1)),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(Duration::ZERO)
        .max(Duration::from_micros(100));
        if let Err(e) = self.timer.reset(wait, None) {
            tracing::warn!("rate limiter timer: {e}");
        }
        self.throttled = true;
        self.throttled_count += 1;
        false
    }

    pub fn is_throttled(&self) -> bool {
        self.throttled
    }

    /// The timer fired: the device may try again.
    pub fn timer_fired(&mut self) {
        let _ = self.timer.wait();
        self.throttled = false;
    }

    pub fn timer_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_that_cannot_be_enforced_are_refused_by_name() {
        let limit = |change: fn(&mut RateLimit)| {
            let mut limit = RateLimit::default();
            change(&mut limit);
            limit.check()
        };
        assert_eq!(limit(|_| {}), Ok(()));
        assert_eq!(
            limit(|l| {
                l.bytes_per_sec = Some(1);
                l.bytes_burst = Some(2);
                l.ops_per_sec = Some(3);
                l.ops_burst = Some(4);
            }),
            Ok(())
        );
        assert_eq!(
            limit(|l| l.bytes_per_sec = Some(0)),
            Err("bytes_per_sec must be at least 1".into())
        );
        assert_eq!(
            limit(|l| {
                l.ops_per_sec = Some(5);
                l.ops_burst = Some(0);
            }),
            Err("ops_burst must be at least 1".into())
        );
        assert_eq!(
            limit(|l| l.bytes_burst = Some(9)),
            Err("bytes_burst needs bytes_per_sec".into())
        );
        assert_eq!(
            limit(|l| l.ops_burst = Some(9)),
            Err("ops_burst needs ops_per_sec".into())
        );
    }

    #[test]
    fn a_bucket_refills_at_its_rate_up_to_its_burst() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(1000, 500, start);
        assert!(bucket.can_take(500, start));
        bucket.take(500);
        assert!(!bucket.can_take(1, start));
        assert_eq!(
            bucket.wait_for(100),
            Duration::from_millis(100) + Duration::from_nanos(1)
        );
        assert!(bucket.can_take(100, start + Duration::from_millis(100)));
        // A long pause refills only up to the burst.
        assert!(!bucket.can_take(501, start + Duration::from_secs(60)) || bucket.tokens == 500);
        assert_eq!(bucket.tokens, 500);
    }

    #[test]
    fn a_request_larger_than_the_burst_passes_on_a_full_bucket_and_leaves_debt() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(1000, 100, start);
        assert!(bucket.can_take(5000, start));
        bucket.take(5000);
        assert!(!bucket.can_take(1, start + Duration::from_secs(4)));
        assert!(bucket.can_take(1, start + Duration::from_millis(4901)));
    }

    #[test]
    fn only_a_rate_limits_a_device() {
        assert!(RateLimit::default().is_unlimited());
        let bytes = RateLimit {
            bytes_per_sec: Some(1),
            ..Default::default()
        };
        let ops = RateLimit {
            ops_per_sec: Some(1),
            ..Default::default()
        };
        assert!(!bytes.is_unlimited());
        assert!(!ops.is_unlimited());
        // A burst alone limits nothing (and `check` refuses it).
        let burst = RateLimit {
            bytes_burst: Some(1),
            ops_burst: Some(1),
            ..Default::default()
        };
        assert!(burst.is_unlimited());
    }

    #[test]
    fn each_zero_is_refused_by_its_name_and_a_burst_with_its_rate_passes() {
        let all = RateLimit {
            bytes_per_sec: Some(1),
            bytes_burst: Some(1),
            ops_per_sec: Some(1),
            ops_burst: Some(1),
        };
        type Zero = fn(&mut RateLimit);
        let zeroes: [(&str, Zero); 4] = [
            ("bytes_per_sec", |l| l.bytes_per_sec = Some(0)),
            ("bytes_burst", |l| l.bytes_burst = Some(0)),
            ("ops_per_sec", |l| l.ops_per_sec = Some(0)),
            ("ops_burst", |l| l.ops_burst = Some(0)),
        ];
        for (name, zero) in zeroes {
            let mut limit = all;
            zero(&mut limit);
            assert_eq!(limit.check(), Err(format!("{name} must be at least 1")));
        }
        for limit in [
            RateLimit {
                bytes_per_sec: Some(1),
                bytes_burst: Some(u64::MAX),
                ..Default::default()
            },
            RateLimit {
                ops_per_sec: Some(u64::MAX),
                ops_burst: Some(1),
                ..Default::default()
            },
        ] {
            assert_eq!(limit.check(), Ok(()), "{limit:?}");
        }
    }

    /// Tokens come back at the rate, the fraction of a token left over at
    /// one refill counted at the next: over one second, `rate` tokens.
    #[test]
    fn a_partial_token_is_carried_to_the_next_refill() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(3, 10, start);
        assert!(bucket.can_take(10, start));
        bucket.take(10);
        assert_eq!(bucket.tokens, 0);
        // 2.4 tokens' time: 2 tokens, 0.4 kept.
        assert!(bucket.can_take(2, start + Duration::from_millis(800)));
        assert!(!bucket.can_take(3, start + Duration::from_millis(800)));
        assert_eq!(bucket.tokens, 2);
        bucket.take(2);
        // 0.4 + 0.6 tokens' time: one more.
        assert!(bucket.can_take(1, start + Duration::from_millis(1000)));
        assert_eq!(bucket.tokens, 1);
        assert!(!bucket.can_take(2, start + Duration::from_millis(1000)));
    }

    /// Time spent full is not counted towards the next token: after a
    /// quiet period, no more than the burst passes before `1 / rate`.
    #[test]
    fn a_full_bucket_banks_no_time() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(1, 1, start);
        let later = start + Duration::from_millis(900);
        assert!(bucket.can_take(1, later));
        bucket.take(1);
        assert!(!bucket.can_take(1, start + Duration::from_millis(1000)));
        assert!(!bucket.can_take(1, later + Duration::from_millis(999)));
        assert!(bucket.can_take(1, later + Duration::from_millis(1000)));
    }

    #[test]
    fn the_wait_is_for_the_missing_tokens_at_most_a_full_bucket() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(1000, 100, start);
        let nanos = Duration::from_nanos;
        // Full: no wait, whatever is asked.
        assert_eq!(bucket.wait_for(100), Duration::ZERO);
        assert_eq!(bucket.wait_for(5000), Duration::ZERO);
        bucket.take(70);
        assert_eq!(bucket.wait_for(30), Duration::ZERO);
        assert_eq!(bucket.wait_for(31), Duration::from_millis(1) + nanos(1));
        assert_eq!(bucket.wait_for(100), Duration::from_millis(70) + nanos(1));
        assert_eq!(bucket.wait_for(5000), Duration::from_millis(70) + nanos(1));
        // In debt: the debt is paid first.
        bucket.take(4030);
        assert_eq!(bucket.tokens, -4000);
        assert_eq!(bucket.wait_for(1), Duration::from_millis(4001) + nanos(1));
    }

    /// The timer's time left, read from its descriptor.
    fn time_left(fd: RawFd) -> Duration {
        // SAFETY: a zeroed itimerspec is valid; timerfd_gettime writes only it.
        let mut spec: libc::itimerspec = unsafe { std::mem::zeroed() };
        // SAFETY: `spec` is a valid itimerspec for the call to fill.
        let ret = unsafe { libc::timerfd_gettime(fd, &mut spec) };
        assert_eq!(ret, 0, "{}", std::io::Error::last_os_error());
        Duration::new(spec.it_value.tv_sec as u64, spec.it_value.tv_nsec as u32)
    }

    /// A throttled device waits on the limiter's timer, armed for when the
    /// shortest bucket has refilled enough; when it fires, the device goes on.
    #[test]
    fn a_throttle_arms_the_timer_and_its_firing_ends_it() {
        let limit = RateLimit {
            ops_per_sec: Some(20),
            ops_burst: Some(1),
            ..Default::default()
        };
        let mut limiter = RateLimiter::new(&limit).unwrap();
        assert!(!limiter.is_throttled());
        assert_eq!(time_left(limiter.timer_fd()), Duration::ZERO);
        assert!(limiter.consume(1 << 30));
        assert!(!limiter.is_throttled());
        assert!(!limiter.consume(0));
        assert!(limiter.is_throttled());
        let left = time_left(limiter.timer_fd());
        assert!(
            left > Duration::from_millis(10) && left <= Duration::from_millis(50),
            "{left:?}"
        );
        limiter.timer_fired();
        assert!(!limiter.is_throttled());
        assert_eq!(limiter.throttled_count, 1);
        assert!(limiter.consume(0));
    }

    #[test]
    fn throttles_on_either_bucket_and_counts_it() {
        let limit = RateLimit {
            bytes_per_sec: Some(1 << 20),
            ops_per_sec: Some(10),
            ..Default::default()
        };
        let mut limiter = RateLimiter::new(&limit).unwrap();
        let now = Instant::now();
        for _ in 0..10 {
            assert!(limiter.consume_at(512, now));
        }
        // Out of operations although bytes remain.
        assert!(!limiter.consume_at(512, now));
        assert!(limiter.is_throttled());
        assert_eq!(limiter.throttled_count, 1);
        limiter.timer_fired();
        assert!(limiter.consume_at(512, now + Duration::from_millis(100)));
        // Out of bytes.
        assert!(!limiter.consume_at(2 << 20, now + Duration::from_millis(100)));
    }

    #[test]
    fn over_any_window_no_more_than_rate_times_window_plus_burst_passes() {
        let limit = RateLimit {
            bytes_per_sec: Some(100_000),
            bytes_burst: Some(20_000),
            ..Default::default()
        };
        let mut limiter = RateLimiter::new(&limit).unwrap();
        let start = Instant::now();
        let mut passed = 0u64;
        // A greedy driver asking every millisecond for 3 s.
        for ms in 0..3000 {
            let now = start + Duration::from_millis(ms);
            // Bounded, so that a limiter that never throttles fails here
            // rather than spinning.
            let in_this_ms = (0..100)
                .take_while(|_| limiter.consume_at(4096, now))
                .count();
            assert!(in_this_ms < 100, "no throttle at {ms} ms");
            passed += 4096 * in_this_ms as u64;
            limiter.throttled = false;
        }
        assert!(passed <= 3 * 100_000 + 20_000 + 4096, "{passed}");
        assert!(passed >= 3 * 100_000 - 4096, "{passed}");
    }
}
