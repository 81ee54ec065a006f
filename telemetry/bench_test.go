package telemetry_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/unicity-iot/unicity/hub"
	"github.com/unicity-iot/unicity/hub/hubtest"
	"github.com/unicity-iot/unicity/internal/benchmetric"
	"github.com/unicity-iot/unicity/telemetry"
)

// BenchmarkSubmit measures the telemetry path one message at a time, the link up to an
// emulated hub over TLS on loopback, next to the in-memory path it replaces (the hub queue
// alone, as the agent had it). The messages are 256 bytes of payload, two properties and the
// "$.mid" Submit gives them; the store is in a temporary directory on the machine's disk.
//
//   - durable/stored: Submit with wait 0, answered once on disk (?wait=0).
//   - durable/delivered: Submit waiting for the PUBACK, through disk, forwarder and hub.
//   - memory/delivered: hub.Queue.Send, the old wait for the PUBACK.
//
// It reports messages per second, the median and 99th percentile latency, and for the store
// the bytes written per message: by the spool (file-B/msg: records, acknowledgement state)
// and as the kernel counts them for the device (io-B/msg, /proc/self/io write_bytes, the file
// system's journal not included).
func BenchmarkSubmit(b *testing.B) {
	srv := hubtest.NewServer(b)
	q := hub.NewQueue(0, 0)
	connect(b, newDeviceCA(b).config(b, srv, "gw-bench"), q)
	payload := []byte(strings.Repeat("x", 256))
	message := func() hub.Message {
		return hub.Message{Payload: payload, Properties: map[string]string{hub.PropContentType: "application/json", hub.PropContentEncoding: "utf-8"}}
	}
	ctx := context.Background()

	for _, run := range []struct {
		name string
		wait time.Duration
	}{{"stored", 0}, {"delivered", 30 * time.Second}} {
		b.Run("durable/"+run.name, func(b *testing.B) {
			st := open(b, telemetry.Options{Dir: b.TempDir(), MaxBytes: 1 << 30})
			forward(b, st, q)
			io0 := benchmetric.IOWriteBytes()
			lat := measure(b, func() error {
				r, err := st.Submit(ctx, "sensor", message(), run.wait)
				if err == nil && run.wait > 0 && !r.Delivered {
					b.Fatal("not delivered")
				}
				return err
			})
			drained(b, st) // the acknowledgements' writes are the message's too
			benchmetric.ReportLatencies(b, lat)
			b.ReportMetric(float64(st.Stats().Written)/float64(b.N), "file-B/msg")
			if io0 >= 0 {
				b.ReportMetric(float64(benchmetric.IOWriteBytes()-io0)/float64(b.N), "io-B/msg")
			}
		})
	}
	b.Run("memory/delivered", func(b *testing.B) {
		benchmetric.ReportLatencies(b, measure(b, func() error { return q.Send(ctx, message()) }))
	})
}

// measure calls op b.N times, one after the other, and returns each call's latency.
func measure(b *testing.B, op func() error) []time.Duration {
	lat := make([]time.Duration, b.N)
	b.ResetTimer()
	for i := range lat {
		start := time.Now()
		if err := op(); err != nil {
			b.Fatal(err)
		}
		lat[i] = time.Since(start)
	}
	b.StopTimer()
	return lat
}
