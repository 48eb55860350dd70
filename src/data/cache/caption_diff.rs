//! How two ordered caption lists differ, in words: what a refusal to reuse a cache says.

use std::collections::HashSet;

/// "caption 17 changed (cache: "…", now: "…"); 3 captions added" — how two ordered caption
/// lists differ. Numbers are 1-based positions in the caption set.
pub(super) fn describe_caption_diff(
    cached_hashes: &[String],
    cached_texts: Option<&[String]>,
    now_hashes: &[String],
    now_texts: &[String],
) -> String {
    let mut parts = Vec::new();
    let common = cached_hashes.len().min(now_hashes.len());
    let changed: Vec<usize> = (0..common)
        .filter(|&i| cached_hashes[i] != now_hashes[i])
        .collect();
    if let Some(&i) = changed.first() {
        let was = cached_texts
            .and_then(|t| t.get(i))
            .map(|t| format!("cache: \"{}\", ", excerpt(t)))
            .unwrap_or_default();
        let now = now_texts
            .get(i)
            .map(|t| format!("now: \"{}\"", excerpt(t)))
            .unwrap_or_default();
        let mut s = format!("caption {} changed ({was}{now})", i + 1);
        if changed.len() > 1 {
            s.push_str(&format!(
                "; {} captions differ at the same position",
                changed.len()
            ));
        }
        parts.push(s);
    }
    let cached_set: HashSet<&String> = cached_hashes.iter().collect();
    let now_set: HashSet<&String> = now_hashes.iter().collect();
    let added = now_hashes
        .iter()
        .filter(|h| !cached_set.contains(h))
        .count();
    let removed = cached_hashes
        .iter()
        .filter(|h| !now_set.contains(h))
        .count();
    let plural = |n: usize| if n == 1 { "caption" } else { "captions" };
    // Captions edited in place: "caption 5 changed" says it all.
    let in_place = cached_hashes.len() == now_hashes.len()
        && added == changed.len()
        && removed == changed.len();
    if in_place && !changed.is_empty() {
        return parts.join("; ");
    }
    if added > 0 {
        parts.push(format!("{added} {} added", plural(added)));
    }
    if removed > 0 {
        parts.push(format!("{removed} {} removed", plural(removed)));
    }
    if added == 0 && removed == 0 && !changed.is_empty() {
        parts.push("the same captions in another order".into());
    }
    if parts.is_empty() {
        parts.push("caption fingerprints differ".into());
    }
    parts.join("; ")
}

fn excerpt(s: &str) -> String {
    const MAX: usize = 60;
    if s.chars().count() <= MAX {
        s.to_string()
    } else {
        let mut e: String = s.chars().take(MAX).collect();
        e.push('…');
        e
    }
}
