package main

import (
	"bytes"
	"log/slog"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"

	"github.com/unicity-iot/unicity/device"
)

// TestServiceLog: on a terminal, plain lines with timestamps; to the journal, no timestamps
// (the journal adds its own) and each line prefixed with its priority, so that
// `journalctl -p err` shows what stopped the agent and `-p warning` its errors.
func TestServiceLog(t *testing.T) {
	for _, tt := range []struct {
		name                     string
		journald, timestamp      bool
		info, warn, fatal, store string
	}{
		{"terminal", false, true, "level=INFO", "level=WARN", "level=ERROR", "level=INFO"},
		{"journald", true, false, "<6>level=INFO", "<4>level=WARN", "<3>level=ERROR", "<6>level=INFO"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var buf bytes.Buffer
			logStatus := statusLogger(serviceLogger(&buf, slog.LevelInfo, tt.journald))
			retrying := device.Status{Phase: device.PhaseProvisioning, Message: "cannot register with DPS: refused; retrying in 2s",
				LastError: "connection refused", NextRetry: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
			logStatus(device.Status{Phase: device.PhaseProvisioning, Message: "registering gw-0001 with DPS (attempt 1)"})
			logStatus(retrying)
			logStatus(retrying)
			logStatus(device.Status{Phase: device.PhaseConnected, Message: "connected", LastError: "disk full", StoreError: "disk full"})
			logStatus(device.Status{Phase: device.PhaseConnected, Message: "connected", LastError: "disk full"})
			logStatus(device.Status{Phase: device.PhaseStopped, Message: "stopped: no TPM", LastError: "no TPM"})
			out := buf.String()
			assert.Equal(t, tt.timestamp, bytes.Contains(buf.Bytes(), []byte("time=")), out)
			assert.Contains(t, out, tt.info+` msg="registering gw-0001 with DPS (attempt 1)" phase=provisioning`)
			assert.Contains(t, out, tt.warn+` msg="connection refused" phase=provisioning`)
			assert.Contains(t, out, `next_retry=2026-01-02T03:04:05Z`)
			assert.Contains(t, out, tt.store+` msg="the assignment in use is stored now" phase=connected`)
			assert.Contains(t, out, tt.fatal+` msg="no TPM" phase=stopped`)
			assert.Equal(t, 8, bytes.Count(buf.Bytes(), []byte("\n")), "an unchanged status is not logged again:\n%s", out)
		})
	}
}

func TestReportHasErrorPriorityInTheJournal(t *testing.T) {
	var buf bytes.Buffer
	assert.Equal(t, exitConfig, report(configErrorf("bad"), &buf, true))
	assert.Equal(t, "<3>unicity: bad\n", buf.String())
	buf.Reset()
	report(configErrorf("bad"), &buf, false)
	assert.Equal(t, "unicity: bad\n", buf.String())
}
