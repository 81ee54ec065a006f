package bench

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"
)

// idle watches a connected agent for Options.Idle: its peak resident memory over that time
// (VmHWM after a reset) and the CPU time it used.
func (h *harness) idle(ctx context.Context, a *agent) error {
	h.step(fmt.Sprintf("connected and idle for %s", h.opts.Idle))
	pid := a.pid()
	if err := resetPeak(pid); err != nil {
		return fmt.Errorf("cannot reset the peak RSS: %w", err)
	}
	cpu0, err := cpuSeconds(pid)
	if err != nil {
		return err
	}
	start := time.Now()
	select {
	case <-time.After(h.opts.Idle):
	case <-a.exited:
		return fmt.Errorf("the agent exited while idle: %v", a.err)
	case <-ctx.Done():
		return ctx.Err()
	}
	cpu1, err := cpuSeconds(pid)
	if err != nil {
		return err
	}
	elapsed := time.Since(start).Seconds()
	peak, rss, err := memory(pid)
	if err != nil {
		return err
	}
	r := h.report
	r.add("peak RSS, connected idle", "MB", []float64{float64(peak) / (1 << 20)}, "<=", 15, fmt.Sprintf("VmHWM over %s idle (reset at its start); VmRSS at the end %.1f MB", h.opts.Idle, float64(rss)/(1<<20)))
	r.add("CPU while idle", "s", []float64{cpu1 - cpu0}, "", 0, fmt.Sprintf("utime+stime over %s (10 ms resolution)", h.opts.Idle))
	r.add("CPU while idle", "% of a core", []float64{100 * (cpu1 - cpu0) / elapsed}, "<=", 0.1, "")
	return nil
}

// telemetry sends messages through the local API of the connected agent for d (POST
// /v1/telemetry, which stores each on disk and answers once the hub's PUBACK arrived): one at
// a time for the latency, then from several clients at once for the throughput; then one at
// a time with ?wait=0, answered once the message is durable (fdatasync'd).
func (h *harness) telemetry(ctx context.Context, d *device) error {
	h.step(fmt.Sprintf("telemetry: %d messages one at a time, then %d from %d clients", h.opts.Messages, h.opts.Messages, telemetryClients))
	sock := filepath.Join(d.runtime, "api.sock")
	client := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", sock)
		},
		MaxIdleConnsPerHost: telemetryClients,
	}}
	post := func(query string, want int, i int) (time.Duration, error) {
		body, _ := json.Marshal(map[string]any{"payload": map[string]any{"seq": i, "temperature": 21.5}})
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://unicity/v1/telemetry"+query, bytes.NewReader(body))
		if err != nil {
			return 0, err
		}
		req.Header.Set("Content-Type", "application/json")
		start := time.Now()
		resp, err := client.Do(req)
		if err != nil {
			return 0, err
		}
		data, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != want {
			return 0, fmt.Errorf("POST /v1/telemetry%s: %s: %s", query, resp.Status, strings.TrimSpace(string(data)))
		}
		return time.Since(start), nil
	}
	send := func(i int) (time.Duration, error) { return post("", http.StatusOK, i) }
	// oneAtATime sends n messages, each after the answer to the one before: the latencies,
	// sorted, and the rate.
	oneAtATime := func(n, from int, send func(int) (time.Duration, error)) ([]float64, float64, error) {
		lat := make([]float64, 0, n)
		start := time.Now()
		for i := range n {
			d, err := send(from + i)
			if err != nil {
				return nil, 0, err
			}
			lat = append(lat, float64(d.Microseconds())/1000)
		}
		rate := float64(n) / time.Since(start).Seconds()
		slices.Sort(lat)
		return lat, rate, nil
	}

	n := h.opts.Messages
	lat, sequential, err := oneAtATime(n, 0, send)
	if err != nil {
		return err
	}

	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		firstErr error
		next     = make(chan int)
	)
	start := time.Now()
	for range telemetryClients {
		wg.Go(func() {
			for i := range next {
				if _, err := send(n + i); err != nil {
					mu.Lock()
					firstErr = cmp.Or(firstErr, err)
					mu.Unlock()
				}
			}
		})
	}
	for i := range n {
		next <- i
	}
	close(next)
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	parallel := float64(n) / time.Since(start).Seconds()
	durable, durableRate, err := oneAtATime(n, 2*n, func(i int) (time.Duration, error) { return post("?wait=0", http.StatusAccepted, i) })
	if err != nil {
		return err
	}

	r := h.report
	r.add("telemetry: PUBACK latency p50", "ms", []float64{percentile(lat, 50)}, "", 0, "POST /v1/telemetry until the hub's PUBACK, one at a time (stored on disk first)")
	r.add("telemetry: PUBACK latency p99", "ms", []float64{percentile(lat, 99)}, "", 0, "")
	r.add("telemetry: messages/s, one at a time", "msg/s", []float64{sequential}, "", 0, "")
	r.add(fmt.Sprintf("telemetry: messages/s, %d clients", telemetryClients), "msg/s", []float64{parallel}, "", 0, "each waits for its PUBACK")
	r.add("telemetry, durable: latency p50", "ms", []float64{percentile(durable, 50)}, "", 0, "POST /v1/telemetry?wait=0 until the message is fdatasync'd, one at a time")
	r.add("telemetry, durable: latency p99", "ms", []float64{percentile(durable, 99)}, "", 0, "")
	r.add("telemetry, durable: messages/s, one at a time", "msg/s", []float64{durableRate}, ">=", 1000, "")
	return nil
}

const telemetryClients = 8

// percentile of sorted samples, nearest rank.
func percentile(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(float64(len(sorted))*p/100+0.5) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

// sizes reports the stripped agent binary per architecture: make cross's output in
// Options.Dist when there is some, else the agent in Options.Bin (make build strips too).
func (h *harness) sizes() error {
	files, _ := filepath.Glob(filepath.Join(h.opts.Dist, "unicity-linux-*"))
	if len(files) == 0 {
		files = []string{filepath.Join(h.opts.Bin, "unicity")}
		h.report.note("binary size: only %s (this architecture); run make cross for every gateway architecture", files[0])
	}
	for _, f := range files {
		st, err := os.Stat(f)
		if err != nil {
			return err
		}
		arch := strings.TrimPrefix(filepath.Base(f), "unicity-linux-")
		if arch == "unicity" {
			arch = "this machine"
		}
		h.report.add("binary size ("+arch+")", "MB", []float64{float64(st.Size()) / 1e6}, "", 0, f+", stripped")
	}
	return nil
}
