package main

import (
	"fmt"
	"path/filepath"
	"sync/atomic"
	"testing"
)

// BenchmarkProvision measures registrations through the whole emulator as serve runs it:
// TLS with a factory-signed certificate, register and poll at DPS (retry-after 0, no poll
// limit), allocation over two hubs and the assignment registered in the hub's registry.
// Client and server share this process and the machine's cores.
func BenchmarkProvision(b *testing.B) {
	dir := filepath.Join(b.TempDir(), "emu")
	if _, code := runCLI(b, "init", "--dir", dir); code != 0 {
		b.Fatal("init failed")
	}
	s := serve(b, dir, "--hubs", "2", "--retry-after", "0", "--poll-limit", "0")
	const fleet = 64
	devices := make([]device, fleet)
	for i := range devices {
		devices[i] = newDevice(b, dir, fmt.Sprintf("bench-%d", i))
	}
	var n atomic.Int64
	b.SetParallelism(4)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			register(b, s, devices[int(n.Add(1))%fleet])
		}
	})
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "registrations/s")
}
