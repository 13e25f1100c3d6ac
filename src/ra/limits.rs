//! The daily limit rules: which ceilings a decision of each tier must fit, and where a customer
//! stands against them. Pure code; the caller reads the amounts used from the decision log's
//! books under the log's lock, so a check and the reservation that follows it are one step.
//!
//! PBOC 296号 Art. 15 caps what a customer may pay per day *when verified at a given strength*.
//! A weaker verification must never add room to a stronger one's ceiling, so the ceilings nest
//! (docs/tiers.md argues the reading):
//!
//! | decision | must fit |
//! |---|---|
//! | A | A + B + C + D ≤ agreed limit (A amounts count toward no other ceiling) |
//! | B | B + C + D ≤ limit B |
//! | C | C + D ≤ limit C, and B + C + D ≤ limit B |
//! | D | D ≤ limit D, C + D ≤ limit C, and B + C + D ≤ limit B |
//!
//! Each decision adds its amount to its own tier's bucket only; a release takes it back from
//! there, so releases undo exactly what a reservation added.

use serde::{Deserialize, Serialize};

use crate::model::Tier;

/// PBOC maxima of the daily ceilings, in fen. An institution may configure lower ones only.
pub const MAX_LIMIT_B_FEN: i64 = 500_000;
pub const MAX_LIMIT_C_FEN: i64 = 100_000;
pub const MAX_LIMIT_D_FEN: i64 = 50_000;
/// Largest `ledger.max_agreed_limit_fen` accepted: sums of a few such amounts stay far from
/// `i64::MAX`, so no ledger addition can overflow.
pub const AGREED_LIMIT_CEILING_FEN: i64 = 1_000_000_000_000_000;

/// How the B, C and D ceilings count a customer's payments of the day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Accumulation {
    /// The ceilings nest: today's D amounts count toward C's ceiling, C and D toward B's.
    #[default]
    Nested,
    /// One independent bucket per tier, so weaker verifications add to the day's envelope
    /// (500 D + 1,000 C + 5,000 B = 6,500 CNY without a certificate). Only for an institution
    /// that has its regulator's word for it; logged as a warning at start.
    PerTier,
}

impl Accumulation {
    /// The configuration spelling.
    pub fn name(self) -> &'static str {
        match self {
            Accumulation::Nested => "nested",
            Accumulation::PerTier => "per_tier",
        }
    }
}

/// One daily ceiling: the limit of `tier`, over the sum of the amounts of the tiers `counts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ceiling {
    pub tier: Tier,
    pub counts: &'static [Tier],
}

const CEILING_A: Ceiling = Ceiling {
    tier: Tier::A,
    counts: &[Tier::A, Tier::B, Tier::C, Tier::D],
};
const CEILING_B: Ceiling = Ceiling {
    tier: Tier::B,
    counts: &[Tier::B, Tier::C, Tier::D],
};
const CEILING_C: Ceiling = Ceiling {
    tier: Tier::C,
    counts: &[Tier::C, Tier::D],
};
const CEILING_D: Ceiling = Ceiling {
    tier: Tier::D,
    counts: &[Tier::D],
};

/// The ceilings a decision of `tier` must fit, innermost first. Every one counts `tier`.
pub fn ceilings(tier: Tier, accumulation: Accumulation) -> &'static [Ceiling] {
    const PER_TIER: [[Ceiling; 1]; 4] = [
        [Ceiling {
            tier: Tier::A,
            counts: &[Tier::A],
        }],
        [Ceiling {
            tier: Tier::B,
            counts: &[Tier::B],
        }],
        [Ceiling {
            tier: Tier::C,
            counts: &[Tier::C],
        }],
        [CEILING_D],
    ];
    const NESTED_A: [Ceiling; 1] = [CEILING_A];
    const NESTED_B: [Ceiling; 1] = [CEILING_B];
    const NESTED_C: [Ceiling; 2] = [CEILING_C, CEILING_B];
    const NESTED_D: [Ceiling; 3] = [CEILING_D, CEILING_C, CEILING_B];
    match (accumulation, tier) {
        (Accumulation::PerTier, tier) => &PER_TIER[tier.index()],
        (Accumulation::Nested, Tier::A) => &NESTED_A,
        (Accumulation::Nested, Tier::B) => &NESTED_B,
        (Accumulation::Nested, Tier::C) => &NESTED_C,
        (Accumulation::Nested, Tier::D) => &NESTED_D,
    }
}

/// One customer's daily limit for each tier, in fen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TierLimits {
    pub a: i64,
    pub b: i64,
    pub c: i64,
    pub d: i64,
}

impl TierLimits {
    /// The limit of `tier`.
    pub fn of(&self, tier: Tier) -> i64 {
        match tier {
            Tier::A => self.a,
            Tier::B => self.b,
            Tier::C => self.c,
            Tier::D => self.d,
        }
    }
}

/// Where a customer stands against one ceiling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CeilingStatus {
    /// The tier whose limit this is.
    pub tier: Tier,
    /// The tiers whose amounts count toward it.
    pub counts: &'static [Tier],
    pub limit_fen: i64,
    /// Today's amounts of the counted tiers, added up.
    pub used_fen: i64,
    /// `limit_fen - used_fen`, never below 0.
    pub remaining_fen: i64,
}

impl CeilingStatus {
    fn new(ceiling: Ceiling, limit_fen: i64, used_fen: i64) -> CeilingStatus {
        CeilingStatus {
            tier: ceiling.tier,
            counts: ceiling.counts,
            limit_fen,
            used_fen,
            remaining_fen: limit_fen.saturating_sub(used_fen).max(0),
        }
    }

    /// Whether `amount_fen` fits in what remains. Never overflows: limits and amounts used
    /// are not negative.
    fn fits(&self, amount_fen: i64) -> bool {
        amount_fen > 0 && self.used_fen <= self.limit_fen && amount_fen <= self.remaining_fen
    }
}

/// A decision's standing against every ceiling it must fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assessment {
    /// Innermost first, as [`ceilings`] lists them.
    pub ceilings: Vec<CeilingStatus>,
    /// Whether the amount fits every ceiling.
    pub fits: bool,
}

impl Assessment {
    /// Assesses `amount_fen` for a decision of `tier`; `used` gives the amount already in one
    /// tier's bucket today (never negative).
    pub fn of(
        tier: Tier,
        amount_fen: i64,
        accumulation: Accumulation,
        limits: &TierLimits,
        used: impl Fn(Tier) -> i64,
    ) -> Assessment {
        let ceilings: Vec<CeilingStatus> = ceilings(tier, accumulation)
            .iter()
            .map(|ceiling| {
                let used_fen = ceiling.counts.iter().fold(0i64, |sum, counted| {
                    sum.saturating_add(used(*counted).max(0))
                });
                CeilingStatus::new(*ceiling, limits.of(ceiling.tier), used_fen)
            })
            .collect();
        let fits = ceilings.iter().all(|ceiling| ceiling.fits(amount_fen));
        Assessment { ceilings, fits }
    }

    /// The same standing once `amount_fen` has been added to the decision's bucket (every
    /// ceiling of a decision counts its own tier).
    pub fn after_adding(mut self, amount_fen: i64) -> Assessment {
        for ceiling in &mut self.ceilings {
            *ceiling = CeilingStatus::new(
                Ceiling {
                    tier: ceiling.tier,
                    counts: ceiling.counts,
                },
                ceiling.limit_fen,
                ceiling.used_fen.saturating_add(amount_fen),
            );
        }
        self
    }

    /// The ceiling with the least room left: the one that binds. On a tie, the innermost.
    pub fn binding(&self) -> &CeilingStatus {
        // `min_by_key` returns the first of equal minima; every decision has a ceiling.
        self.ceilings
            .iter()
            .min_by_key(|ceiling| ceiling.remaining_fen)
            .unwrap_or(&self.ceilings[0])
    }
}

/// Ledger policy from configuration.
#[derive(Debug, Clone)]
pub struct LedgerPolicy {
    pub utc_offset_s: i32,
    pub accumulation: Accumulation,
    /// Tier A limit of a customer without an agreement: the institution's standard-terms
    /// figure if it configured one, else the B limit.
    pub standard_agreed_limit_fen: Option<i64>,
    /// Largest agreed limit `SetAgreedLimit` accepts.
    pub max_agreed_limit_fen: i64,
    pub limit_b_fen: i64,
    pub limit_c_fen: i64,
    pub limit_d_fen: i64,
    pub skew_ms: i64,
}

impl LedgerPolicy {
    /// A customer's limits, given their agreed tier-A limit if they have one.
    pub fn limits(&self, agreed_fen: Option<i64>) -> TierLimits {
        TierLimits {
            a: agreed_fen
                .or(self.standard_agreed_limit_fen)
                .unwrap_or(self.limit_b_fen),
            b: self.limit_b_fen,
            c: self.limit_c_fen,
            d: self.limit_d_fen,
        }
    }

    /// The first day whose ledger buckets payra keeps (yesterday, by `now_ms`): limits apply
    /// per day, and a reservation of an earlier day can no longer change one that counts.
    pub fn first_tracked_day(&self, now_ms: i64) -> String {
        self.day(now_ms - 86_400_000)
    }

    /// When `day` (`YYYY-MM-DD`, as [`LedgerPolicy::day`] writes it) begins, in Unix ms.
    pub fn day_start_ms(&self, day: &str) -> Option<i64> {
        let format = time::macros::format_description!("[year]-[month]-[day]");
        let date = time::Date::parse(day, &format).ok()?;
        let local_s = date.midnight().assume_utc().unix_timestamp();
        Some((local_s - i64::from(self.utc_offset_s)) * 1000)
    }

    /// The ledger day of `now_ms`: the calendar date in the configured time zone.
    pub fn day(&self, now_ms: i64) -> String {
        let local_s = now_ms.div_euclid(1000) + i64::from(self.utc_offset_s);
        match time::OffsetDateTime::from_unix_timestamp(local_s) {
            Ok(t) => format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day()),
            Err(_) => "out-of-range".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const PBOC: TierLimits = TierLimits {
        a: 5_000_000,
        b: 500_000,
        c: 100_000,
        d: 50_000,
    };

    /// A day of one customer's reservations, applied the way the RA applies them: assess,
    /// and add to the decision's own bucket only if it fits.
    struct Day {
        used: HashMap<Tier, i64>,
        accumulation: Accumulation,
    }

    impl Day {
        fn new(accumulation: Accumulation) -> Day {
            Day {
                used: HashMap::new(),
                accumulation,
            }
        }

        fn reserve(&mut self, tier: Tier, amount_fen: i64) -> Assessment {
            let used = self.used.clone();
            let assessment = Assessment::of(tier, amount_fen, self.accumulation, &PBOC, |t| {
                used.get(&t).copied().unwrap_or(0)
            });
            if assessment.fits {
                *self.used.entry(tier).or_default() += amount_fen;
            }
            assessment
        }

        fn release(&mut self, tier: Tier, amount_fen: i64) {
            *self.used.entry(tier).or_default() -= amount_fen;
        }
    }

    #[test]
    fn nested_ceilings_table() {
        use Tier::*;
        // (name, earlier reservations that fit, then the decision, whether it fits, binding
        // ceiling, its remaining before the decision)
        type Case = (
            &'static str,
            &'static [(Tier, i64)],
            (Tier, i64),
            bool,
            Tier,
            i64,
        );
        let table: &[Case] = &[
            ("D alone up to 500", &[], (D, 50_000), true, D, 50_000),
            ("D over 500", &[], (D, 50_001), false, D, 50_000),
            (
                "C after D: C+D <= 1000",
                &[(D, 50_000)],
                (C, 50_000),
                true,
                C,
                50_000,
            ),
            (
                "C after D over C+D",
                &[(D, 50_000)],
                (C, 50_001),
                false,
                C,
                50_000,
            ),
            (
                "the review's case: 500 D + 500 C + 5000 B = 6000 is refused",
                &[(D, 50_000), (C, 50_000)],
                (B, 500_000),
                false,
                B,
                400_000,
            ),
            (
                "B after C and D: B+C+D <= 5000",
                &[(D, 50_000), (C, 50_000)],
                (B, 400_000),
                true,
                B,
                400_000,
            ),
            (
                "B after C and D over B+C+D",
                &[(D, 50_000), (C, 50_000)],
                (B, 400_001),
                false,
                B,
                400_000,
            ),
            (
                "D after B: room under D but not under B",
                &[(B, 480_000)],
                (D, 30_000),
                false,
                B,
                20_000,
            ),
            (
                "C after B leaves C room but B binds",
                &[(B, 450_000)],
                (C, 60_000),
                false,
                B,
                50_000,
            ),
            (
                "A does not consume B/C/D",
                &[(A, 4_000_000)],
                (B, 500_000),
                true,
                B,
                500_000,
            ),
            (
                "B/C/D count toward the agreed limit: no weaker verification adds room",
                &[(B, 450_000), (D, 50_000)],
                (A, 4_500_000),
                true,
                A,
                4_500_000,
            ),
            (
                "over the agreed limit with B/C/D counted",
                &[(B, 450_000), (D, 50_000)],
                (A, 4_500_001),
                false,
                A,
                4_500_000,
            ),
            (
                "no factor at all: 500 D then 1000 C is refused",
                &[(D, 50_000)],
                (C, 100_000),
                false,
                C,
                50_000,
            ),
        ];
        for (name, before, (tier, amount), fits, binding, remaining) in table {
            let mut day = Day::new(Accumulation::Nested);
            for (t, a) in *before {
                assert!(day.reserve(*t, *a).fits, "{name}: set-up {t:?} {a}");
            }
            let assessment = day.reserve(*tier, *amount);
            assert_eq!(assessment.fits, *fits, "{name}");
            assert_eq!(assessment.binding().tier, *binding, "{name}");
            assert_eq!(assessment.binding().remaining_fen, *remaining, "{name}");
        }
    }

    #[test]
    fn the_review_day_totals_at_most_the_b_ceiling_without_a_certificate() {
        let mut day = Day::new(Accumulation::Nested);
        assert!(day.reserve(Tier::D, 50_000).fits);
        assert!(day.reserve(Tier::C, 50_000).fits);
        assert!(!day.reserve(Tier::C, 1).fits, "C + D is at 1,000 CNY");
        assert!(day.reserve(Tier::B, 400_000).fits);
        assert!(!day.reserve(Tier::B, 1).fits, "B + C + D is at 5,000 CNY");
        assert!(!day.reserve(Tier::D, 1).fits);
        let total: i64 = day.used.values().sum();
        assert_eq!(total, 500_000);
    }

    #[test]
    fn per_tier_keeps_independent_buckets() {
        let mut day = Day::new(Accumulation::PerTier);
        assert!(day.reserve(Tier::D, 50_000).fits);
        assert!(day.reserve(Tier::C, 100_000).fits);
        assert!(day.reserve(Tier::B, 500_000).fits);
        assert_eq!(day.used.values().sum::<i64>(), 650_000);
        assert!(!day.reserve(Tier::B, 1).fits);
    }

    #[test]
    fn a_release_gives_back_exactly_the_room_it_took() {
        let mut day = Day::new(Accumulation::Nested);
        assert!(day.reserve(Tier::D, 30_000).fits);
        assert!(day.reserve(Tier::C, 70_000).fits);
        assert!(!day.reserve(Tier::C, 1).fits);
        day.release(Tier::D, 30_000);
        let again = day.reserve(Tier::C, 30_000);
        assert!(again.fits, "the D release frees C's ceiling");
        assert!(!day.reserve(Tier::D, 1).fits, "C + D is full again");
    }

    #[test]
    fn after_adding_counts_the_amount_in_every_ceiling() {
        let assessment = Assessment::of(Tier::D, 10_000, Accumulation::Nested, &PBOC, |t| {
            if t == Tier::B {
                100_000
            } else {
                0
            }
        })
        .after_adding(10_000);
        let used: Vec<i64> = assessment.ceilings.iter().map(|c| c.used_fen).collect();
        assert_eq!(used, [10_000, 10_000, 110_000]);
        assert_eq!(assessment.binding().tier, Tier::D);
    }

    #[test]
    fn huge_limits_and_amounts_never_overflow() {
        let limits = TierLimits {
            a: i64::MAX,
            ..PBOC
        };
        let assessment = Assessment::of(Tier::A, i64::MAX, Accumulation::Nested, &limits, |_| {
            i64::MAX
        });
        assert!(!assessment.fits);
        let after = assessment.after_adding(i64::MAX);
        assert_eq!(after.ceilings[0].used_fen, i64::MAX);
        assert_eq!(after.ceilings[0].remaining_fen, 0);
        let zero_used = Assessment::of(Tier::A, i64::MAX, Accumulation::Nested, &limits, |_| 0);
        assert!(zero_used.fits);
    }

    #[test]
    fn a_zero_or_negative_amount_never_fits() {
        for amount in [0, -1, i64::MIN] {
            let a = Assessment::of(Tier::C, amount, Accumulation::Nested, &PBOC, |_| 0);
            assert!(!a.fits, "{amount}");
        }
    }
}
