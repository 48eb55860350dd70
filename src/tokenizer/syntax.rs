//! Prompt weighting as artists type it, read the way their tools read it, and removed before
//! the LLM sees the prompt: `comfy` is ComfyUI's `CLIPTextEncode` (`comfy.sd1_clip.token_weights`:
//! `(text)` x1.1 per level, `(text:1.3)` sets the weight, `\(` `\)` escape), `a1111` is
//! AUTOMATIC1111's `parse_prompt_attention` (also `[text]` /1.1, weights multiply with the
//! brackets around them, `\[` `\]` `\\` escape, `BREAK` read as a space). The result is the
//! clean text plus the weight of every byte of it; the tokenizer gives each token the mean
//! weight of the bytes it covers.
//!
//! Where the tools would silently guess, this is an error naming the span: a weight that is
//! not a number (ComfyUI would keep `red:1,5` as text at x1.1), negative, NaN, infinite or over
//! 100.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// The largest weight accepted: far past any useful emphasis, short of overflowing attention.
pub const MAX_WEIGHT: f64 = 100.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PromptSyntax {
    /// The prompt is plain text.
    #[default]
    None,
    Comfy,
    A1111,
}

impl FromStr for PromptSyntax {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Self::None),
            "comfy" => Ok(Self::Comfy),
            "a1111" => Ok(Self::A1111),
            o => Err(Error::Invalid(format!(
                "prompt syntax \"{o}\": expected \"comfy\", \"a1111\" or \"none\""
            ))),
        }
    }
}

impl fmt::Display for PromptSyntax {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Comfy => "comfy",
            Self::A1111 => "a1111",
        })
    }
}

/// A prompt read with its syntax: consecutive segments of the text the LLM reads, each with
/// one weight (segments of equal weight are kept apart, as the tools keep them).
#[derive(Debug, Clone, PartialEq)]
pub struct WeightedPrompt {
    pub segments: Vec<(String, f64)>,
}

impl WeightedPrompt {
    pub fn parse(prompt: &str, syntax: PromptSyntax) -> Result<Self> {
        let segments = match syntax {
            PromptSyntax::None => vec![(prompt.to_string(), 1.0)],
            PromptSyntax::Comfy => comfy(prompt)?,
            PromptSyntax::A1111 => a1111(prompt)?,
        };
        Ok(Self { segments })
    }

    /// The text the LLM reads.
    pub fn text(&self) -> String {
        self.segments.iter().map(|(t, _)| t.as_str()).collect()
    }

    /// The weight of every byte of `text()`.
    pub fn byte_weights(&self) -> Vec<f32> {
        self.segments
            .iter()
            .flat_map(|(t, w)| std::iter::repeat_n(*w as f32, t.len()))
            .collect()
    }

    pub fn is_plain(&self) -> bool {
        self.segments.iter().all(|(_, w)| *w == 1.0)
    }
}

/// A weight the user wrote, checked: `span` is the whole bracketed text, for the message.
fn checked_weight(raw: &str, span: &str) -> Result<f64> {
    let w = python_float(raw).ok_or_else(|| {
        Error::Invalid(format!(
            "the weight \"{}\" in \"{span}\" is not a number; to keep a ':' inside a weighted \
             span, end the span with a weight, e.g. \"({}:1.1)\"",
            raw.trim(),
            &span[1..span.len() - 1]
        ))
    })?;
    if !(0.0..=MAX_WEIGHT).contains(&w) {
        return Err(Error::Invalid(format!(
            "the weight {} in \"{span}\" is out of range: weights go from 0 (the span is not \
             attended to) to {MAX_WEIGHT}",
            raw.trim()
        )));
    }
    Ok(w)
}

/// Python's `float(text)`: surrounding whitespace, a sign, digits with single underscores
/// between them, `inf`/`infinity`/`nan` in any case. (Python also takes non-ASCII decimal
/// digits; those are not numbers here.)
fn python_float(text: &str) -> Option<f64> {
    let t = text.trim();
    let b = t.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        if c == b'_' {
            let between =
                i > 0 && i + 1 < b.len() && b[i - 1].is_ascii_digit() && b[i + 1].is_ascii_digit();
            if !between {
                return None;
            }
        }
    }
    // Past underscores and whitespace, Rust's float grammar is Python's.
    let plain: String = t.chars().filter(|&c| c != '_').collect();
    plain.parse::<f64>().ok()
}

// -- ComfyUI -----------------------------------------------------------------------------------

const ESC_CLOSE: &str = "\u{0}\u{1}";
const ESC_OPEN: &str = "\u{0}\u{2}";

/// `comfy.sd1_clip.token_weights(escape_important(prompt), 1.0)`, segments unescaped.
fn comfy(prompt: &str) -> Result<Vec<(String, f64)>> {
    let escaped = prompt.replace("\\)", ESC_CLOSE).replace("\\(", ESC_OPEN);
    let mut out = Vec::new();
    comfy_weights(&escaped, 1.0, &mut out)?;
    Ok(out
        .into_iter()
        .map(|(t, w)| (t.replace(ESC_CLOSE, ")").replace(ESC_OPEN, "("), w))
        .collect())
}

/// `comfy.sd1_clip.parse_parentheses`: top-level pieces, bracketed ones with their brackets.
fn comfy_pieces(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut level: i64 = 0;
    for c in s.chars() {
        match c {
            '(' => {
                if level == 0 {
                    if !current.is_empty() {
                        out.push(std::mem::take(&mut current));
                    }
                    current.push('(');
                } else {
                    current.push(c);
                }
                level += 1;
            }
            ')' => {
                level -= 1;
                if level == 0 {
                    current.push(')');
                    out.push(std::mem::take(&mut current));
                } else {
                    current.push(c);
                }
            }
            _ => current.push(c),
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

fn comfy_weights(s: &str, weight: f64, out: &mut Vec<(String, f64)>) -> Result<()> {
    for piece in comfy_pieces(s) {
        if piece.chars().count() >= 2 && piece.starts_with('(') && piece.ends_with(')') {
            let inner = &piece[1..piece.len() - 1];
            match inner.rfind(':') {
                // A colon at the very start is text (`xx > 0` in ComfyUI); one followed by a
                // bracket belongs to a nested span (`((x:2))`), where ComfyUI's float() fails
                // and it reads on: only a colon at this level introduces a weight.
                Some(i) if i > 0 && !inner[i + 1..].contains(['(', ')']) => {
                    let w = checked_weight(&inner[i + 1..], &piece)?;
                    comfy_weights(&inner[..i], w, out)?;
                }
                _ => comfy_weights(inner, weight * 1.1, out)?,
            }
        } else {
            out.push((piece, weight));
        }
    }
    Ok(())
}

// -- AUTOMATIC1111 -----------------------------------------------------------------------------

/// `modules.prompt_parser.parse_prompt_attention`, token by token as its regular expression
/// splits the prompt.
fn a1111(prompt: &str) -> Result<Vec<(String, f64)>> {
    let mut res: Vec<(String, f64)> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply = |res: &mut Vec<(String, f64)>, from: usize, m: f64| {
        for r in &mut res[from..] {
            r.1 *= m;
        }
    };
    let mut rest = prompt;
    while let Some(c) = rest.chars().next() {
        let (token, len) = match c {
            '\\' => match rest[1..].chars().next() {
                Some(e @ ('(' | ')' | '[' | ']' | '\\')) => {
                    res.push((e.to_string(), 1.0));
                    (None, 2)
                }
                _ => (None, 1), // a lone backslash is dropped, as A1111 does
            },
            '(' => {
                round.push(res.len());
                (None, 1)
            }
            '[' => {
                square.push(res.len());
                (None, 1)
            }
            ':' => match a1111_weight(rest) {
                Some((raw, len)) if !round.is_empty() => {
                    let open = round.pop().unwrap();
                    let span = format!("({}{})", text_since(&res, open), &rest[..len]);
                    let w = checked_weight(raw, &span)?;
                    multiply(&mut res, open, w);
                    (None, len)
                }
                Some((_, len)) => (Some(&rest[..len]), len),
                None => (Some(":"), 1),
            },
            ')' if !round.is_empty() => {
                let open = round.pop().unwrap();
                multiply(&mut res, open, 1.1);
                (None, 1)
            }
            ']' if !square.is_empty() => {
                let open = square.pop().unwrap();
                multiply(&mut res, open, 1.0 / 1.1);
                (None, 1)
            }
            ')' | ']' => (Some(&rest[..1]), 1),
            _ => {
                let len = rest
                    .find(['\\', '(', ')', '[', ']', ':'])
                    .unwrap_or(rest.len());
                (Some(&rest[..len]), len)
            }
        };
        if let Some(text) = token {
            res.push((replace_break(text), 1.0));
        }
        rest = &rest[len..];
    }
    for open in round {
        multiply(&mut res, open, 1.1);
    }
    for open in square {
        multiply(&mut res, open, 1.0 / 1.1);
    }
    Ok(res.into_iter().filter(|(t, _)| !t.is_empty()).collect())
}

/// `:\s*([+-]?[.\d]+)\s*\)` at the start of `s`: the weight's text and the match's length.
fn a1111_weight(s: &str) -> Option<(&str, usize)> {
    let after = &s[1..];
    let ws = after.len() - after.trim_start().len();
    let num = &after[ws..];
    let mut n = 0;
    for (i, c) in num.char_indices() {
        let sign = (c == '+' || c == '-') && i == 0;
        if sign || c == '.' || c.is_ascii_digit() {
            n = i + c.len_utf8();
        } else {
            break;
        }
    }
    let digits = num[..n].trim_start_matches(['+', '-']);
    if digits.is_empty() {
        return None;
    }
    let tail = &num[n..];
    let ws2 = tail.len() - tail.trim_start().len();
    tail[ws2..]
        .starts_with(')')
        .then(|| (&num[..n], 1 + ws + n + ws2 + 1))
}

fn text_since(res: &[(String, f64)], from: usize) -> String {
    res[from..].iter().map(|(t, _)| t.as_str()).collect()
}

/// A1111 starts a new 75-token chunk at the word `BREAK` (taking the whitespace around it); an
/// LLM reads one sequence, so it becomes one space.
fn replace_break(text: &str) -> String {
    let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("BREAK") {
        let (before, after) = (&rest[..i], &rest[i + 5..]);
        if word(before.chars().next_back()) || word(after.chars().next()) {
            out.push_str(&rest[..i + 5]);
        } else {
            out.push_str(before.trim_end());
            out.push(' ');
            rest = after.trim_start();
            continue;
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comfy_of(p: &str) -> Vec<(String, f64)> {
        WeightedPrompt::parse(p, PromptSyntax::Comfy)
            .unwrap()
            .segments
    }

    #[test]
    fn comfy_reads_as_comfyui() {
        let s = |t: &str, w: f64| (t.to_string(), w);
        assert_eq!(
            comfy_of("a (red:1.5) cube"),
            vec![s("a ", 1.0), s("red", 1.5), s(" cube", 1.0)]
        );
        assert_eq!(comfy_of("((x))"), vec![s("x", 1.0 * 1.1 * 1.1)]);
        // an explicit weight replaces the brackets' product, as in ComfyUI
        assert_eq!(comfy_of("((x:2))"), vec![s("x", 2.0)]);
        assert_eq!(comfy_of("(a:(b))"), vec![s("a:", 1.1), s("b", 1.1 * 1.1)]);
        assert_eq!(comfy_of(r"\(x\)"), vec![s("(x)", 1.0)]);
        assert_eq!(comfy_of("(:1.2)"), vec![s(":1.2", 1.1)]);
        assert_eq!(comfy_of("(x: 1_0 )"), vec![s("x", 10.0)]);
        // a stray ")" takes the level below zero, so the "(" after it opens nothing
        assert_eq!(comfy_of("a)b(c"), vec![s("a)b(c", 1.0)]);
    }

    #[test]
    fn bad_weights_name_the_span() {
        for (p, what) in [
            ("a (red:1,5) cube", "not a number"),
            ("(red:-1)", "out of range"),
            ("(red:nan)", "out of range"),
            ("(red:inf)", "out of range"),
            ("(red:101)", "out of range"),
        ] {
            let e = WeightedPrompt::parse(p, PromptSyntax::Comfy)
                .unwrap_err()
                .to_string();
            assert!(e.contains(what) && e.contains("red"), "{p}: {e}");
        }
        let e = WeightedPrompt::parse("[(red:1000)]", PromptSyntax::A1111).unwrap_err();
        assert!(e.to_string().contains("(red:1000)"), "{e}");
        // A1111's weights have no exponent: "1e3" is text there
        let a = WeightedPrompt::parse("(red:1e3)", PromptSyntax::A1111).unwrap();
        assert_eq!(a.text(), "red:1e3");
    }

    #[test]
    fn a1111_reads_as_a1111() {
        let a = |p: &str| {
            WeightedPrompt::parse(p, PromptSyntax::A1111)
                .unwrap()
                .segments
        };
        let s = |t: &str, w: f64| (t.to_string(), w);
        assert_eq!(
            a("a (red:1.5) cube"),
            vec![s("a ", 1.0), s("red", 1.5), s(" cube", 1.0)]
        );
        // weights multiply with the brackets around them
        assert_eq!(a("((x:2))"), vec![s("x", 2.0 * 1.1)]);
        assert_eq!(a("[x]"), vec![s("x", 1.0 / 1.1)]);
        assert_eq!(
            a(r"\[x\] \\"),
            vec![
                s("[", 1.0),
                s("x", 1.0),
                s("]", 1.0),
                s(" ", 1.0),
                s("\\", 1.0)
            ]
        );
        // unclosed brackets still weigh what follows them
        assert_eq!(a("(x"), vec![s("x", 1.1)]);
        assert_eq!(a("x:1.2)"), vec![s("x", 1.0), s(":1.2)", 1.0)]);
        let text = |p: &str| {
            WeightedPrompt::parse(p, PromptSyntax::A1111)
                .unwrap()
                .text()
        };
        assert_eq!(text("a  BREAK\nb BREAKING"), "a b BREAKING");
    }

    #[test]
    fn plain_text_is_one_segment() {
        let w = WeightedPrompt::parse("(x:2)", PromptSyntax::None).unwrap();
        assert!(w.is_plain() && w.text() == "(x:2)");
        assert_eq!(w.byte_weights(), vec![1.0; 5]);
    }
}
