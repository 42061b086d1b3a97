//! The token bucket that limits the ICMP messages the datapath generates
//! ("fragmentation needed", "administratively prohibited"), as the kernel's
//! `icmp_msgs_per_sec` and `icmp_msgs_burst` limit its own: one bucket per
//! CPU, so a flood that calls for answers gets at most this many per CPU.

use crate::IcmpBucket;

/// Messages per second, per CPU.
pub const ICMP_PER_SECOND: u64 = 1000;
/// Messages that may go out at once after a quiet spell.
pub const ICMP_BURST: u64 = 50;

const NS_PER_MESSAGE: u64 = 1_000_000_000 / ICMP_PER_SECOND;
const MAX_CREDIT_NS: u64 = ICMP_BURST * NS_PER_MESSAGE;

/// Whether one more message may go out at `now_ns`; takes its token if so.
#[inline(always)]
pub const fn take(bucket: &mut IcmpBucket, now_ns: u64) -> bool {
    let earned = now_ns.saturating_sub(bucket.updated_ns);
    let credit = bucket.credit_ns.saturating_add(earned);
    let credit = if credit > MAX_CREDIT_NS { MAX_CREDIT_NS } else { credit };
    bucket.updated_ns = now_ns;
    if credit < NS_PER_MESSAGE {
        bucket.credit_ns = credit;
        return false;
    }
    bucket.credit_ns = credit - NS_PER_MESSAGE;
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let mut bucket = IcmpBucket::default();
        let start = 10_000_000_000;
        let burst = (0..200).filter(|_| take(&mut bucket, start)).count() as u64;
        assert_eq!(burst, ICMP_BURST, "a fresh bucket allows a burst");
        let mut sent = 0;
        for step in 1..=1000u64 {
            // One second in 1 ms steps, ten attempts each.
            for _ in 0..10 {
                sent += take(&mut bucket, start + step * 1_000_000) as u64;
            }
        }
        assert_eq!(sent, ICMP_PER_SECOND, "then the rate, however many are asked for");
    }

    #[test]
    fn a_clock_that_goes_back_gives_no_credit() {
        let mut bucket = IcmpBucket { credit_ns: 0, updated_ns: 5_000_000_000 };
        assert!(!take(&mut bucket, 1_000_000_000));
    }
}
