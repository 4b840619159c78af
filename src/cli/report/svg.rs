//! Charts as standalone SVG documents (no script, no network): line charts with round ticks
//! and a legend, and heatmaps of expert load.

use std::fmt::Write as _;

/// A named series of (x, y) points.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend label.
    pub label: String,
    /// (x, y) points.
    pub points: Vec<(f64, f64)>,
}

/// A line chart.
#[derive(Debug, Clone, PartialEq)]
pub struct LineChart {
    /// File name stem and HTML id.
    pub id: String,
    /// Chart title.
    pub title: String,
    /// Y axis label.
    pub y_label: String,
    /// The curves.
    pub series: Vec<Series>,
    /// The y axis starts at 0 (fractions, probabilities) rather than at the data's minimum.
    pub y_from_zero: bool,
}

/// Expert load over training: `cells[expert][column]` = fraction of tokens, one column per
/// logged step.
#[derive(Debug, Clone, PartialEq)]
pub struct Heatmap {
    /// File name stem and HTML id.
    pub id: String,
    /// Chart title.
    pub title: String,
    /// The validation steps (columns).
    pub steps: Vec<u64>,
    /// One row per expert, one value per step.
    pub cells: Vec<Vec<f64>>,
}

pub(crate) const PALETTE: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

pub(crate) fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The chart as a standalone SVG document.
pub fn line_svg(c: &LineChart) -> String {
    let (w, h, left, right, top, bottom) = (680.0, 340.0, 64.0, 150.0, 36.0, 44.0);
    let pts = c.series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        if y.is_finite() {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 == x0 {
        x1 = x0 + 1.0;
    }
    if c.y_from_zero {
        y0 = y0.min(0.0);
    }
    if y1 == y0 {
        y1 = y0 + 1.0;
    }
    // Round ticks (1, 2 or 5 x 10^k apart); the axes end on ticks.
    let xt = nice_ticks(x0, x1);
    let yt = nice_ticks(y0, y1);
    let (x0, x1) = (xt[0], xt[xt.len() - 1]);
    let (y0, y1) = (yt[0], yt[yt.len() - 1]);
    let sx = |x: f64| left + (x - x0) / (x1 - x0) * (w - left - right);
    let sy = |y: f64| top + (y1 - y) / (y1 - y0) * (h - top - bottom);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12" data-chart="{}">"#,
        esc(&c.id)
    );
    let _ = write!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = write!(
        s,
        r#"<text x="{left}" y="20" font-size="15" font-weight="bold">{}</text>"#,
        esc(&c.title)
    );
    for &yv in &yt {
        let _ = write!(
            s,
            r##"<line x1="{left}" x2="{}" y1="{y}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
            w - right,
            left - 6.0,
            sy(yv) + 4.0,
            fmt_tick(yv, &yt),
            y = sy(yv)
        );
    }
    for &xv in &xt {
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            sx(xv),
            h - bottom + 16.0,
            fmt_tick(xv, &xt)
        );
    }
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">step</text><text x="14" y="{}" transform="rotate(-90 14 {})" text-anchor="middle">{}</text>"#,
        (left + w - right) / 2.0,
        h - 6.0,
        (top + h - bottom) / 2.0,
        (top + h - bottom) / 2.0,
        esc(&c.y_label)
    );
    for (i, ser) in c.series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let path: Vec<String> = ser
            .points
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let _ = write!(
            s,
            r#"<polyline data-series="{}" data-points="{}" fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
            esc(&ser.label),
            ser.points.len(),
            path.join(" ")
        );
        let ly = top + 16.0 * i as f64 + 8.0;
        let _ = write!(
            s,
            r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            w - right + 10.0,
            w - right + 28.0,
            w - right + 32.0,
            ly + 4.0,
            esc(&fit_label(&ser.label))
        );
    }
    s.push_str("</svg>");
    s
}

/// The heatmap as a standalone SVG document: experts down, logged steps across, darker =
/// more tokens.
pub fn heatmap_svg(hm: &Heatmap) -> String {
    let (n_e, n_s) = (hm.cells.len(), hm.steps.len());
    let (left, top, w, h) = (70.0, 36.0, 620.0, (n_e as f64 * 18.0).clamp(60.0, 400.0));
    let (cw, ch) = (w / n_s.max(1) as f64, h / n_e.max(1) as f64);
    let max = hm.cells.iter().flatten().cloned().fold(1e-9, f64::max);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-family="sans-serif" font-size="12" data-chart="{}" data-experts="{n_e}" data-steps="{n_s}">"#,
        left + w + 90.0,
        top + h + 40.0,
        esc(&hm.id)
    );
    let _ = write!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{left}" y="20" font-size="15" font-weight="bold">{}</text>"#,
        esc(&hm.title)
    );
    for (e, row) in hm.cells.iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            let shade = (255.0 * (1.0 - v / max)).round() as u8;
            let _ = write!(
                s,
                r#"<rect x="{:.1}" y="{:.1}" width="{:.2}" height="{:.2}" fill="rgb({shade},{shade},255)"><title>expert {e}, step {}: {:.3}</title></rect>"#,
                left + j as f64 * cw,
                top + e as f64 * ch,
                cw + 0.3,
                ch + 0.3,
                hm.steps[j],
                v
            );
        }
        if n_e <= 24 || e % (n_e / 16).max(1) == 0 {
            let _ = write!(
                s,
                r#"<text x="{}" y="{:.1}" text-anchor="end">expert {e}</text>"#,
                left - 6.0,
                top + (e as f64 + 0.5) * ch + 4.0
            );
        }
    }
    if let (Some(first), Some(last)) = (hm.steps.first(), hm.steps.last()) {
        let _ = write!(
            s,
            r#"<text x="{left}" y="{}">step {first}</text><text x="{}" y="{}" text-anchor="end">step {last}</text>"#,
            top + h + 16.0,
            left + w,
            top + h + 16.0
        );
    }
    let _ = write!(
        s,
        r#"<text x="{}" y="{}">max {:.2}</text>"#,
        left + w + 8.0,
        top + 12.0,
        max
    );
    s.push_str("</svg>");
    s
}

/// Ticks 1, 2 or 5 x 10^k apart covering `[lo, hi]` (`lo < hi`, finite), about five of them,
/// the first at or below `lo` and the last at or above `hi`.
pub(crate) fn nice_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let raw = (hi - lo) / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).floor();
    let last = (hi / step).ceil();
    // Multiples of the step, computed from integers so that 0.30000000000000004 never shows.
    (first as i64..=last as i64)
        .map(|i| i as f64 * step)
        .collect()
}

/// A tick label with as many decimals as the ticks' spacing needs.
fn fmt_tick(v: f64, ticks: &[f64]) -> String {
    let step = if ticks.len() > 1 {
        ticks[1] - ticks[0]
    } else {
        1.0
    };
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    format!("{v:.decimals$}")
}

/// A legend label cut to fit the legend's width (about 18 characters), with an ellipsis.
fn fit_label(label: &str) -> String {
    const MAX: usize = 18;
    if label.chars().count() <= MAX {
        label.to_string()
    } else {
        let cut: String = label.chars().take(MAX - 1).collect();
        format!("{cut}…")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        for (lo, hi) in [
            (1.2, 4.364),
            (0.0, 82.5),
            (-0.3, 0.7),
            (1000.0, 3700.0),
            (0.0, 1e-3),
        ] {
            let t = nice_ticks(lo, hi);
            assert!(t[0] <= lo && *t.last().unwrap() >= hi, "{lo}..{hi}: {t:?}");
            assert!((3..=12).contains(&t.len()), "{lo}..{hi}: {t:?}");
            let step = t[1] - t[0];
            let mantissa = step / 10f64.powf(step.log10().floor());
            assert!(
                [1.0, 2.0, 5.0].iter().any(|m| (mantissa - m).abs() < 1e-9),
                "{lo}..{hi}: step {step}"
            );
            for v in &t {
                let label = fmt_tick(*v, &t);
                assert!(label.len() <= 8, "{label}");
            }
        }
        assert_eq!(
            nice_ticks(0.0, 82.5),
            vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]
        );
        assert_eq!(fmt_tick(0.5, &[0.0, 0.5, 1.0]), "0.5");
        assert_eq!(
            fit_label("a very long run name indeed train"),
            "a very long run n…"
        );
    }
}
