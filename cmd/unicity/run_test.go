package main

import (
	"bytes"
	"log/slog"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"

	"github.com/unicity-iot/unicity/device"
)

func TestServiceLogLeavesTimestampsToTheJournal(t *testing.T) {
	for _, tt := range []struct {
		name, journal string
		timestamp     bool
	}{
		{"terminal", "", true},
		{"journald", "8:12345", false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv("JOURNAL_STREAM", tt.journal)
			var buf bytes.Buffer
			logStatus := statusLogger(serviceLogger(&buf, slog.LevelInfo))
			logStatus(device.Status{Phase: device.PhaseProvisioning, Message: "registering gw-0001 with DPS (attempt 1)"})
			logStatus(device.Status{Phase: device.PhaseProvisioning, Message: "cannot register with DPS: refused; retrying in 2s",
				LastError: "connection refused", NextRetry: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)})
			logStatus(device.Status{Phase: device.PhaseProvisioning, Message: "cannot register with DPS: refused; retrying in 2s",
				LastError: "connection refused", NextRetry: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)})
			out := buf.String()
			assert.Equal(t, tt.timestamp, bytes.Contains(buf.Bytes(), []byte("time=")), out)
			assert.Contains(t, out, `level=INFO msg="registering gw-0001 with DPS (attempt 1)" phase=provisioning`)
			assert.Contains(t, out, `level=WARN msg="connection refused" phase=provisioning`)
			assert.Contains(t, out, `next_retry=2026-01-02T03:04:05Z`)
			assert.Equal(t, 3, bytes.Count(buf.Bytes(), []byte("\n")), "an unchanged status is not logged again:\n%s", out)
		})
	}
}
