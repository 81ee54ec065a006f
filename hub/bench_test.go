package hub_test

import (
	"context"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/unicity-iot/unicity/hub"
	"github.com/unicity-iot/unicity/hub/hubtest"
)

// benchClient is a client connected to an emulated hub over TLS on loopback.
func benchClient(b *testing.B, queue int) *hub.Client {
	srv := hubtest.NewServer(b)
	ca := newDeviceCA(b)
	cert := ca.softwareDevice(b, srv.Hub, "gw-bench")
	cfg := config(srv, "gw-bench", cert)
	cfg.Queue = hub.NewQueue(queue, 64<<20)
	c, err := hub.New(cfg)
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); c.Run(ctx) }()
	b.Cleanup(func() { cancel(); <-done })
	wait, stop := context.WithTimeout(ctx, 20*time.Second)
	defer stop()
	if err := c.AwaitConnection(wait); err != nil {
		b.Fatal(err)
	}
	return c
}

// BenchmarkTelemetryThroughput pipelines 256-byte messages through the queue (32 in flight)
// and reports messages per second acknowledged by the hub.
func BenchmarkTelemetryThroughput(b *testing.B) {
	c := benchClient(b, b.N+1)
	payload := []byte(strings.Repeat("x", 256))
	props := map[string]string{hub.PropContentType: "application/json", "seq": "0"}
	acks := make([]<-chan struct{}, 0, b.N)
	b.ResetTimer()
	start := time.Now()
	for range b.N {
		ack, err := c.Queue().Enqueue(hub.Message{Payload: payload, Properties: props})
		if err != nil {
			b.Fatal(err)
		}
		acks = append(acks, ack)
	}
	for _, ack := range acks {
		<-ack
	}
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "msgs/s")
}

// BenchmarkPubackLatency sends one message at a time and reports the time from Send to
// PUBACK (median and 99th percentile).
func BenchmarkPubackLatency(b *testing.B) {
	c := benchClient(b, 0)
	payload := []byte(strings.Repeat("x", 256))
	lat := make([]time.Duration, 0, b.N)
	ctx := context.Background()
	b.ResetTimer()
	for range b.N {
		t := time.Now()
		if err := c.Send(ctx, hub.Message{Payload: payload}); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(t))
	}
	b.StopTimer()
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
}

// BenchmarkConnectedMemory reports the process's resident memory and Go heap with a
// connected session (the emulator shares the process, so both are upper bounds for the
// client).
func BenchmarkConnectedMemory(b *testing.B) {
	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	c := benchClient(b, 0)
	for range b.N {
		if err := c.Send(context.Background(), hub.Message{Payload: []byte("x")}); err != nil {
			b.Fatal(err)
		}
	}
	runtime.GC()
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	b.ReportMetric(float64(int64(after.HeapInuse)-int64(before.HeapInuse))/1024, "heap-delta-KiB")
	b.ReportMetric(float64(rssKiB()), "rss-KiB")
}

func rssKiB() int {
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for line := range strings.SplitSeq(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			n, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(rest), " kB"))
			return n
		}
	}
	return 0
}
