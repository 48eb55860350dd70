//! The loss-curve PNG: training loss per optimizer step and held-out MSE, log-scaled, with
//! min/max labels. A self-contained PNG writer (stored deflate) keeps this dependency-free.

use std::path::Path;

use crate::error::Result;
use crate::formats::safetensors::write_atomic;

const W: usize = 640;
const H: usize = 360;
const MARGIN: usize = 40;

pub struct Series<'a> {
    pub points: &'a [(f64, f64)],
    pub rgb: [u8; 3],
}

/// An RGB picture, row-major, 3 bytes a pixel.
pub struct LossImage {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
}

/// Renders `series` (x = step, y = loss) to an RGB PNG and writes it atomically.
pub fn write_loss_png(path: &Path, series: &[Series]) -> Result<()> {
    let png = encode_png(&render(series), W, H);
    write_atomic(path, &png)
}

/// The same picture as pixels (hosts show it without reading the PNG).
pub fn render_loss_rgb(series: &[Series]) -> LossImage {
    LossImage {
        width: W,
        height: H,
        rgb: render(series),
    }
}

fn render(series: &[Series]) -> Vec<u8> {
    let mut img = vec![255u8; W * H * 3];
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(_, y)| y.is_finite() && *y > 0.0)
        .collect();
    let (x0, x1) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y0, y1) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), p| {
        (a.min(p.1.ln()), b.max(p.1.ln()))
    });
    let (pw, ph) = ((W - 2 * MARGIN) as f64, (H - 2 * MARGIN) as f64);
    let gray = [200, 200, 200];
    for i in 0..=4 {
        let y = MARGIN + (H - 2 * MARGIN) * i / 4;
        line(
            &mut img,
            MARGIN as f64,
            y as f64,
            (W - MARGIN) as f64,
            y as f64,
            gray,
        );
    }
    line(
        &mut img,
        MARGIN as f64,
        MARGIN as f64,
        MARGIN as f64,
        (H - MARGIN) as f64,
        [0, 0, 0],
    );
    line(
        &mut img,
        MARGIN as f64,
        (H - MARGIN) as f64,
        (W - MARGIN) as f64,
        (H - MARGIN) as f64,
        [0, 0, 0],
    );
    if all.is_empty() {
        return img;
    }
    let sx = |x: f64| {
        MARGIN as f64
            + if x1 > x0 {
                (x - x0) / (x1 - x0) * pw
            } else {
                pw / 2.0
            }
    };
    let sy = |y: f64| {
        (H - MARGIN) as f64
            - if y1 > y0 {
                (y.ln() - y0) / (y1 - y0) * ph
            } else {
                ph / 2.0
            }
    };
    for s in series {
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|(_, y)| y.is_finite() && *y > 0.0)
            .collect();
        for w in pts.windows(2) {
            line(
                &mut img,
                sx(w[0].0),
                sy(w[0].1),
                sx(w[1].0),
                sy(w[1].1),
                s.rgb,
            );
        }
        if let [only] = pts[..] {
            dot(&mut img, sx(only.0), sy(only.1), s.rgb);
        }
    }
    text(&mut img, 2, MARGIN - 4, &fmt_num(y1.exp()));
    text(&mut img, 2, H - MARGIN - 4, &fmt_num(y0.exp()));
    text(&mut img, MARGIN, H - MARGIN + 8, &fmt_num(x0));
    let right = fmt_num(x1);
    text(
        &mut img,
        W - MARGIN - right.len() * 4,
        H - MARGIN + 8,
        &right,
    );
    img
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 1000.0 || v == v.trunc() {
        format!("{}", v.round() as i64)
    } else if v.abs() >= 0.01 {
        format!("{v:.3}")
    } else {
        format!("{v:.1e}")
    }
}

fn put(img: &mut [u8], x: i64, y: i64, rgb: [u8; 3]) {
    if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
        let i = (y as usize * W + x as usize) * 3;
        img[i..i + 3].copy_from_slice(&rgb);
    }
}

fn dot(img: &mut [u8], x: f64, y: f64, rgb: [u8; 3]) {
    for dx in -1..=1 {
        for dy in -1..=1 {
            put(img, x as i64 + dx, y as i64 + dy, rgb);
        }
    }
}

fn line(img: &mut [u8], x0: f64, y0: f64, x1: f64, y1: f64, rgb: [u8; 3]) {
    let n = (x1 - x0).abs().max((y1 - y0).abs()).ceil().max(1.0) as usize;
    for i in 0..=n {
        let t = i as f64 / n as f64;
        put(
            img,
            (x0 + (x1 - x0) * t).round() as i64,
            (y0 + (y1 - y0) * t).round() as i64,
            rgb,
        );
    }
}

/// 3x5 glyphs for digits and the few signs numbers need.
fn glyph(c: char) -> [u8; 5] {
    match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        '+' => [0, 2, 7, 2, 0],
        'e' => [0, 7, 7, 4, 7],
        _ => [0; 5],
    }
}

fn text(img: &mut [u8], x: usize, y: usize, s: &str) {
    for (k, c) in s.chars().enumerate() {
        for (row, bits) in glyph(c).iter().enumerate() {
            for col in 0..3 {
                if bits >> (2 - col) & 1 == 1 {
                    put(img, (x + k * 4 + col) as i64, (y + row) as i64, [0, 0, 0]);
                }
            }
        }
    }
}

fn encode_png(rgb: &[u8], w: usize, h: usize) -> Vec<u8> {
    let mut raw = Vec::with_capacity((w * 3 + 1) * h);
    for row in rgb.chunks(w * 3) {
        raw.push(0);
        raw.extend_from_slice(row);
    }
    let mut z = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65_535).collect();
    for (i, b) in blocks.iter().enumerate() {
        z.push(u8::from(i + 1 == blocks.len()));
        z.extend_from_slice(&(b.len() as u16).to_le_bytes());
        z.extend_from_slice(&(!(b.len() as u16)).to_le_bytes());
        z.extend_from_slice(b);
    }
    z.extend_from_slice(&adler32(&raw).to_be_bytes());
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&(w as u32).to_be_bytes());
    ihdr.extend_from_slice(&(h as u32).to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, data) in [(b"IHDR", &ihdr[..]), (b"IDAT", &z[..]), (b"IEND", &[][..])] {
        png.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = png.len();
        png.extend_from_slice(kind);
        png.extend_from_slice(data);
        let crc = crc32(&png[start..]);
        png.extend_from_slice(&crc.to_be_bytes());
    }
    png
}

fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &x in data {
        a = (a + x as u32) % 65_521;
        b = (b + a) % 65_521;
    }
    (b << 16) | a
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &x in data {
        c ^= x as u32;
        for _ in 0..8 {
            c = if c & 1 == 1 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}
