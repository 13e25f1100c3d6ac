//! Output for people: times as RFC 3339 with a hint of how far away they are, money as CNY
//! with two decimals beside the fen. `--json` output keeps Unix seconds and fen.

/// `2026-12-04T06:45:37Z (in 10 min)`; the hint is relative to `now_s`.
pub fn time(unix_s: i64, now_s: i64) -> String {
    format!("{} ({})", rfc3339(unix_s), relative(unix_s - now_s))
}

/// `2026-12-04T06:45:37Z`, or the raw number when it is out of range.
pub fn rfc3339(unix_s: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix_s)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{unix_s} (Unix seconds)"))
}

/// `in 10 min`, `3 days ago`, `now`.
pub fn relative(delta_s: i64) -> String {
    let magnitude = delta_s.unsigned_abs();
    let amount = match magnitude {
        0..=9 => return "now".to_string(),
        10..=89 => format!("{magnitude} s"),
        90..=5_399 => format!("{} min", (magnitude + 30) / 60),
        5_400..=129_599 => format!("{} h", (magnitude + 1_800) / 3_600),
        _ => {
            let days = (magnitude + 43_200) / 86_400;
            format!("{days} day{}", if days == 1 { "" } else { "s" })
        }
    };
    if delta_s > 0 {
        format!("in {amount}")
    } else {
        format!("{amount} ago")
    }
}

/// `50,000.00 CNY`.
pub fn cny(fen: i64) -> String {
    let sign = if fen < 0 { "-" } else { "" };
    let magnitude = fen.unsigned_abs();
    let yuan = (magnitude / 100).to_string();
    let mut grouped = String::new();
    for (i, digit) in yuan.chars().enumerate() {
        if i > 0 && (yuan.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    format!("{sign}{grouped}.{:02} CNY", magnitude % 100)
}

/// `50,000.00 CNY (5000000 fen)`.
pub fn money(fen: i64) -> String {
    format!("{} ({fen} fen)", cny(fen))
}

/// The current time, for relative hints.
pub fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_rfc_3339_with_a_hint() {
        assert_eq!(rfc3339(1_796_341_505), "2026-12-03T23:45:05Z");
        assert_eq!(
            time(1_796_342_405, 1_796_341_805),
            "2026-12-04T00:00:05Z (in 10 min)"
        );
        assert_eq!(relative(-3 * 86_400), "3 days ago");
        assert_eq!(relative(-86_400), "24 h ago");
        assert_eq!(relative(-2 * 86_400), "2 days ago");
        assert_eq!(relative(7_200), "in 2 h");
        assert_eq!(relative(30), "in 30 s");
        assert_eq!(relative(-2), "now");
    }

    #[test]
    fn money_reads_as_cny_with_two_decimals() {
        assert_eq!(cny(5_000_000), "50,000.00 CNY");
        assert_eq!(cny(1_734), "17.34 CNY");
        assert_eq!(cny(5), "0.05 CNY");
        assert_eq!(cny(-123_456_789), "-1,234,567.89 CNY");
        assert_eq!(cny(i64::MIN), "-92,233,720,368,547,758.08 CNY");
        assert_eq!(money(100), "1.00 CNY (100 fen)");
    }
}
