// Package benchmetric reports what the store-and-forward benchmarks measure beyond ns/op:
// throughput and latency percentiles of one-message operations, and the bytes the kernel
// wrote to storage for them. Test-only.
package benchmetric

import (
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// ReportLatencies reports msg/s over the benchmark's elapsed time and the p50 and p99 of
// lat, one latency per operation (b.N of them).
func ReportLatencies(b *testing.B, lat []time.Duration) {
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msg/s")
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2])/1e3, "p50-µs")
	b.ReportMetric(float64(lat[len(lat)*99/100])/1e3, "p99-µs")
}

// IOWriteBytes is what the kernel counts this process as having sent to storage
// (/proc/self/io write_bytes), or -1 where it does not say.
func IOWriteBytes() int64 {
	data, err := os.ReadFile("/proc/self/io")
	if err != nil {
		return -1
	}
	for line := range strings.SplitSeq(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "write_bytes: "); ok {
			if n, err := strconv.ParseInt(v, 10, 64); err == nil {
				return n
			}
		}
	}
	return -1
}
