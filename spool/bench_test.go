package spool

import (
	"context"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/unicity-iot/unicity/hub"
	"github.com/unicity-iot/unicity/internal/benchmetric"
)

// benchMessage is a typical telemetry message: 256 bytes of payload and three properties.
func benchMessage(n int) Message {
	return Message{
		App:        "sensor",
		Properties: map[string]string{"$.mid": "bench-" + strconv.Itoa(n), "$.ct": "application/json", "$.ce": "utf-8"},
		Payload:    []byte(strings.Repeat("x", 256)),
	}
}

// BenchmarkDurableAppend measures Append to a spool in a temporary directory (the machine's
// disk: every Append waits for fdatasync) and, for comparison, on tmpfs (/dev/shm: the
// spool's own cost) and the in-memory hub.Queue it replaces. One at a time, and from 16
// goroutines, where appends share fdatasyncs. It reports messages per second, the median
// and 99th percentile latency, and bytes written per message: by the spool (file-B/msg)
// and as the kernel counts them for the device (io-B/msg, /proc/self/io write_bytes, the
// file system's journal not included).
func BenchmarkDurableAppend(b *testing.B) {
	places := map[string]string{"disk": b.TempDir()}
	if info, err := os.Stat("/dev/shm"); err == nil && info.IsDir() {
		dir, err := os.MkdirTemp("/dev/shm", "spool-bench-")
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { os.RemoveAll(dir) })
		places["tmpfs"] = dir
	}
	for _, place := range []string{"disk", "tmpfs"} {
		base, ok := places[place]
		if !ok {
			continue
		}
		for _, run := range []struct {
			name    string
			writers int
			send    bool
		}{{"writers=1", 1, false}, {"writers=16", 16, false}, {"writers=1+sender", 1, true}} {
			b.Run(place+"/"+run.name, func(b *testing.B) {
				dir, err := os.MkdirTemp(base, "")
				if err != nil {
					b.Fatal(err)
				}
				s, err := Open(dir, Options{MaxBytes: 1 << 30})
				if err != nil {
					b.Fatal(err)
				}
				defer s.Close()
				if run.send {
					// The link is up: a sender takes and acknowledges every message, so the
					// acknowledgement state and segment removals cost their writes too.
					go func() {
						for {
							r, err := s.Next(context.Background())
							if err != nil {
								return
							}
							s.Ack(r.ID)
						}
					}()
				}
				io0 := benchmetric.IOWriteBytes()
				lat := measure(b, run.writers, func(n int) error {
					_, err := s.Append(context.Background(), benchMessage(n))
					return err
				})
				benchmetric.ReportLatencies(b, lat)
				b.ReportMetric(float64(s.Stats().Written)/float64(b.N), "file-B/msg")
				if io0 >= 0 {
					b.ReportMetric(float64(benchmetric.IOWriteBytes()-io0)/float64(b.N), "io-B/msg")
				}
			})
		}
	}
	for _, writers := range []int{1, 16} {
		b.Run("memory/writers="+strconv.Itoa(writers), func(b *testing.B) {
			q := hub.NewQueue(b.N+1, 1<<30)
			lat := measure(b, writers, func(n int) error {
				m := benchMessage(n)
				_, err := q.Enqueue(hub.Message{Payload: m.Payload, Properties: m.Properties})
				return err
			})
			benchmetric.ReportLatencies(b, lat)
		})
	}
}

// measure runs b.N calls of op from writers goroutines and returns each call's latency.
func measure(b *testing.B, writers int, op func(n int) error) []time.Duration {
	lat := make([]time.Duration, b.N)
	var next sync.Mutex
	n := 0
	var wg sync.WaitGroup
	b.ResetTimer()
	for range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				next.Lock()
				i := n
				n++
				next.Unlock()
				if i >= b.N {
					return
				}
				t := time.Now()
				if err := op(i); err != nil {
					b.Error(err)
					return
				}
				lat[i] = time.Since(t)
			}
		}()
	}
	wg.Wait()
	b.StopTimer()
	return lat
}
