//! Schema names: `t_<run>_<test>_<attempt>`, at most 63 bytes, unique across runs.

use std::collections::HashMap;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

/// Postgres truncates identifiers longer than this many bytes.
pub(crate) const MAX_IDENTIFIER: usize = 63;

/// A short, stable tag for a run id (8 hex digits).
pub(crate) fn run_tag(run_id: &str) -> String {
    hex::encode(&Sha256::digest(run_id.as_bytes())[..4])
}

/// Builds the schema name for one test attempt. `nth` counts databases the same test
/// asked for in this process (0 for the first).
pub(crate) fn schema_name(run_id: &str, test_name: &str, attempt: u32, nth: u32) -> String {
    let tail = if nth == 0 {
        format!("_{attempt}")
    } else {
        format!("_{attempt}_{nth}")
    };
    let head = format!("t_{}_", run_tag(run_id));
    let slug = slug(test_name);
    let room = MAX_IDENTIFIER - head.len() - tail.len();
    if slug.len() <= room {
        return format!("{head}{slug}{tail}");
    }
    // Too long: keep the end of the name (the most specific part) and a hash of the whole,
    // so that two long names never collide.
    let hash = hex::encode(&Sha256::digest(test_name.as_bytes())[..3]);
    let keep = room - hash.len() - 1;
    let cut = &slug[slug.len() - keep..];
    format!("{head}{}_{hash}{tail}", cut.trim_start_matches('_'))
}

/// Lower-case ASCII letters, digits and single underscores; module paths keep their last
/// two segments (`tests::users::creates` → `users_creates`).
fn slug(test_name: &str) -> String {
    let segments: Vec<&str> = test_name.split("::").filter(|s| !s.is_empty()).collect();
    let start = segments.len().saturating_sub(2);
    let mut out = String::new();
    for ch in segments[start..].join("_").chars() {
        let ch = ch.to_ascii_lowercase();
        if ch.is_ascii_alphanumeric() {
            out.push(ch);
        } else if !out.ends_with('_') {
            out.push('_');
        }
    }
    let out = out.trim_matches('_').to_owned();
    if out.is_empty() {
        "test".to_owned()
    } else {
        out
    }
}

/// How many databases each test name has asked for in this process so far.
pub(crate) fn next_nth(test_name: &str) -> u32 {
    static SEEN: Mutex<Option<HashMap<String, u32>>> = Mutex::new(None);
    let mut seen = SEEN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let counter = seen
        .get_or_insert_with(HashMap::new)
        .entry(test_name.to_owned())
        .or_insert(0);
    let nth = *counter;
    *counter += 1;
    nth
}

/// A positive 31-bit key for advisory locks, derived from a name.
pub(crate) fn lock_key(name: &str) -> i32 {
    let digest = Sha256::digest(name.as_bytes());
    let raw = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    (raw & 0x7fff_ffff) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_read_naturally() {
        let name = schema_name("run-1", "api::creates_a_todo", 1, 0);
        assert_eq!(name, format!("t_{}_api_creates_a_todo_1", run_tag("run-1")));
        assert_eq!(
            schema_name("run-1", "x", 2, 1),
            format!("t_{}_x_2_1", run_tag("run-1"))
        );
    }

    #[test]
    fn names_are_valid_identifiers_of_at_most_63_bytes() {
        let long = "tests::a_module_with_a_rather_long_name::a_test_whose_name_goes_on_and_on_and_on_forever";
        for attempt in [1, 10, 999] {
            let name = schema_name("0190f1e2-aaaa-bbbb-cccc-0123456789ab", long, attempt, 3);
            assert!(
                name.len() <= MAX_IDENTIFIER,
                "{name} is {} bytes",
                name.len()
            );
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{name}"
            );
            assert!(name.starts_with("t_"), "{name}");
        }
        let weird = schema_name("r", "Ünïcode & Spaces -- 'quotes'", 1, 0);
        assert!(
            weird
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "{weird}"
        );
    }

    #[test]
    fn long_names_that_share_an_ending_stay_distinct() {
        let a = format!("m::{}_end", "a".repeat(80));
        let b = format!("m::{}_end", "b".repeat(80));
        let c = format!("n::{}_end", "a".repeat(80));
        let names = [
            schema_name("r", &a, 1, 0),
            schema_name("r", &b, 1, 0),
            schema_name("r", &c, 1, 0),
        ];
        assert_ne!(names[0], names[1]);
        assert_ne!(names[0], names[2]);
    }

    #[test]
    fn different_runs_give_different_names() {
        assert_ne!(
            schema_name("run-a", "t", 1, 0),
            schema_name("run-b", "t", 1, 0)
        );
    }

    #[test]
    fn nth_counts_per_test() {
        let name = format!("counter-{}", uuid::Uuid::new_v4());
        assert_eq!(next_nth(&name), 0);
        assert_eq!(next_nth(&name), 1);
        assert_eq!(next_nth("another-name-for-counting"), 0);
    }

    #[test]
    fn lock_keys_read_back_unchanged_from_pg_locks() {
        // pg_locks reports an advisory key as an oid (unsigned 32 bits), which the reaper
        // compares with the ledger's int4 key: they agree only for keys that are not
        // negative. Names whose hash has its top bit set are the ones that would break.
        let names: Vec<String> = (0..)
            .map(|i| format!("t_00000000_test_{i}"))
            .filter(|name| Sha256::digest(name.as_bytes())[0] >= 0x80)
            .take(16)
            .collect();
        for name in &names {
            let key = lock_key(name);
            assert_eq!(i64::from(key as u32), i64::from(key), "{name}");
        }
        assert_ne!(lock_key(&names[0]), lock_key(&names[1]));
    }
}
