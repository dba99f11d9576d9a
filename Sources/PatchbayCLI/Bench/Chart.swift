// `patchbay bench --svg FILE`: the run as one picture. Each latency row is a pair of
// distributions on a shared logarithmic axis, Patchbay above its raw Linux baseline (whisker from
// the 1st to the 99th percentile, box from the 25th to the 75th, a tick at the median), with the
// ratio and its verdict beside them; the cross-CPU floor (the pure-spin ping-pong's median) is a
// dashed line through every row. Throughput rows follow as pairs of bars.

import Glibc

extension Samples {
    /// The value below which `fraction` of the samples lie (0 when there are none).
    func percentile(_ fraction: Double) -> UInt64 {
        guard !values.isEmpty else { return 0 }
        let index = Int((Double(values.count - 1) * fraction).rounded())
        return values[min(max(index, 0), values.count - 1)]
    }
}

enum BenchChart {
    private static let width = 1180.0
    private static let labelWidth = 390.0
    private static let plotLeft = 410.0
    private static let plotRight = 960.0
    private static let rowHeight = 42.0
    private static let top = 92.0

    /// The SVG document for `rows` (`title` on top).
    static func svg(rows: [BenchRow], title: String) -> String {
        let latency = rows.filter { $0.unit == "ns" && $0.samples.median > 0 }
        let throughput = rows.filter { $0.unit.hasSuffix("/s") }
        let sizes = rows.filter { $0.unit != "ns" && !$0.unit.hasSuffix("/s") }
        let values = latency.flatMap { row in [row.samples.percentile(0.01), row.samples.percentile(0.99)]
            + (row.baselineSamples.map { [$0.percentile(0.01), $0.percentile(0.99)] } ?? []) }.filter { $0 > 0 }
        // Whole decades around everything shown.
        let low = pow(10, floor(log10(Double(values.min() ?? 10))))
        let high = pow(10, ceil(log10(Double(max(values.max() ?? 1000, UInt64(low) * 10)))))
        func x(_ nanoseconds: UInt64) -> Double {
            let value = min(max(Double(max(nanoseconds, 1)), low), high)
            return plotLeft + (log10(value) - log10(low)) / (log10(high) - log10(low)) * (plotRight - plotLeft)
        }
        let latencyHeight = Double(latency.count) * rowHeight
        let throughputTop = top + latencyHeight + 70
        let sizesTop = throughputTop + Double(throughput.count) * rowHeight + 50
        let height = sizesTop + Double(sizes.count) * 20 + 30
        var out = """
        <svg xmlns="http://www.w3.org/2000/svg" width="\(Int(width))" height="\(Int(height))" viewBox="0 0 \(Int(width)) \(Int(height))" font-family="Helvetica, Arial, sans-serif" font-size="12">
        <rect width="100%" height="100%" fill="white"/>
        <text x="20" y="26" font-size="16" font-weight="bold">\(escape(title))</text>
        <text x="20" y="46" fill="#555">Latency, log scale: whisker p1–p99, box p25–p75, tick at the median. Blue: Patchbay; grey: the raw Linux baseline measured in the same run.</text>

        """
        // Decade grid.
        var decade = low
        while decade <= high {
            let position = x(UInt64(decade))
            out += "<line x1=\"\(f(position))\" y1=\"\(f(top - 8))\" x2=\"\(f(position))\" y2=\"\(f(top + latencyHeight))\" stroke=\"#ddd\"/>\n"
            out += "<text x=\"\(f(position))\" y=\"\(f(top + latencyHeight + 16))\" text-anchor=\"middle\" fill=\"#555\">\(formatNanoseconds(UInt64(decade)))</text>\n"
            decade *= 10
        }
        // The floor: the bare cross-CPU hand-off.
        if let floor = rows.first(where: { $0.baseline == "shm pure-spin ping-pong" })?.baselineSamples?.median, floor > 0 {
            let position = x(floor)
            out += "<line x1=\"\(f(position))\" y1=\"\(f(top - 12))\" x2=\"\(f(position))\" y2=\"\(f(top + latencyHeight))\" stroke=\"#c0392b\" stroke-dasharray=\"4 3\"/>\n"
            out += "<text x=\"\(f(position + 4))\" y=\"\(f(top - 14))\" fill=\"#c0392b\">floor: pure-spin ping-pong \(formatNanoseconds(floor))</text>\n"
        }
        for (index, row) in latency.enumerated() {
            let y = top + Double(index) * rowHeight
            if index % 2 == 1 {
                out += "<rect x=\"10\" y=\"\(f(y - 4))\" width=\"\(f(width - 20))\" height=\"\(f(rowHeight))\" fill=\"#f6f6f6\"/>\n"
            }
            out += "<text x=\"20\" y=\"\(f(y + 12))\">\(escape(row.name))</text>\n"
            out += "<text x=\"20\" y=\"\(f(y + 27))\" fill=\"#777\">vs \(escape(row.baseline))</text>\n"
            out += distribution(row.samples, y: y + 2, color: "#2c6fbb", x: x)
            if let baseline = row.baselineSamples { out += distribution(baseline, y: y + 18, color: "#999", x: x) }
            out += verdict(row, y: y + 20)
        }
        out += "<text x=\"20\" y=\"\(f(throughputTop - 24))\" font-size=\"14\" font-weight=\"bold\">Throughput</text>\n"
        let fastest = Double(throughput.flatMap { [$0.samples.median, $0.baselineSamples?.median ?? 0] }.max() ?? 1)
        for (index, row) in throughput.enumerated() {
            let y = throughputTop + Double(index) * rowHeight
            out += "<text x=\"20\" y=\"\(f(y + 12))\">\(escape(row.name))</text>\n"
            out += "<text x=\"20\" y=\"\(f(y + 27))\" fill=\"#777\">vs \(escape(row.baseline))</text>\n"
            for (offset, samples, color) in [(2.0, row.samples, "#2c6fbb"), (18.0, row.baselineSamples ?? Samples([]), "#999")] {
                let length = Double(samples.median) / max(fastest, 1) * (plotRight - plotLeft) * 0.8
                out += "<rect x=\"\(f(plotLeft))\" y=\"\(f(y + offset))\" width=\"\(f(length))\" height=\"12\" fill=\"\(color)\"/>\n"
                out += "<text x=\"\(f(plotLeft + length + 6))\" y=\"\(f(y + offset + 10))\" fill=\"#333\">\(formatRate(samples.median)) \(escape(row.unit))</text>\n"
            }
            out += verdict(row, y: y + 20)
        }
        if !sizes.isEmpty {
            out += "<text x=\"20\" y=\"\(f(sizesTop - 20))\" font-size=\"14\" font-weight=\"bold\">Memory</text>\n"
        }
        for (index, row) in sizes.enumerated() {
            let y = sizesTop + Double(index) * 20
            let color = row.met.map { $0 ? "#1e8449" : "#c0392b" } ?? "#555"
            out += "<text x=\"20\" y=\"\(f(y))\">\(escape(row.name))</text>\n"
            out += "<text x=\"\(f(plotLeft))\" y=\"\(f(y))\" fill=\"\(color)\">\(row.samples.median) \(escape(row.unit)) "
                + "(target \(escape(row.target)))</text>\n"
        }
        out += "</svg>\n"
        return out
    }

    private static func distribution(_ samples: Samples, y: Double, color: String, x: (UInt64) -> Double) -> String {
        let (p1, p25, p50, p75, p99) = (x(samples.percentile(0.01)), x(samples.percentile(0.25)), x(samples.median),
                                         x(samples.percentile(0.75)), x(samples.percentile(0.99)))
        return """
        <line x1="\(f(p1))" y1="\(f(y + 6))" x2="\(f(p99))" y2="\(f(y + 6))" stroke="\(color)"/>
        <rect x="\(f(p25))" y="\(f(y))" width="\(f(max(p75 - p25, 1)))" height="12" fill="\(color)" fill-opacity="0.35" stroke="\(color)"/>
        <line x1="\(f(p50))" y1="\(f(y - 2))" x2="\(f(p50))" y2="\(f(y + 14))" stroke="\(color)" stroke-width="2.5"/>

        """
    }

    private static func verdict(_ row: BenchRow, y: Double) -> String {
        let ratio = row.ratio.map { format2($0) + "×" } ?? "—"
        let color = row.met.map { $0 ? "#1e8449" : "#c0392b" } ?? "#555"
        let word = row.met.map { $0 ? "met" : "missed" } ?? ""
        return "<text x=\"\(f(plotRight + 14))\" y=\"\(f(y - 4))\" fill=\"\(color)\" font-weight=\"bold\">\(ratio)</text>\n"
            + "<text x=\"\(f(plotRight + 14))\" y=\"\(f(y + 10))\" fill=\"\(color)\">\(escape(row.target)) \(word)</text>\n"
    }

    /// One decimal, as SVG coordinates need no more.
    private static func f(_ value: Double) -> String {
        let tenths = Int((value * 10).rounded())
        return tenths < 0 ? "-" + f(-value) : "\(tenths / 10).\(tenths % 10)"
    }

    private static func escape(_ text: String) -> String {
        var escaped = ""
        for character in text {
            switch character {
            case "&": escaped += "&amp;"
            case "<": escaped += "&lt;"
            case ">": escaped += "&gt;"
            case "\"": escaped += "&quot;"
            default: escaped.append(character)
            }
        }
        return escaped
    }
}
