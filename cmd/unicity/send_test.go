package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/hub"
	"github.com/unicity-iot/unicity/internal/dial"
)

func TestHubErrorExitCodes(t *testing.T) {
	tests := []struct {
		err  error
		code int
	}{
		{&hub.ConnectError{ReturnCode: 5}, exitRefused},
		{&hub.ConnectError{ReturnCode: 4}, exitRefused},
		{hub.ErrQueueFull, exitTempFail},
		{hub.ErrTimeout, exitTempFail},
		{fmt.Errorf("cannot connect: %w", dial.ErrUnreachable), exitUnavailable},
	}
	for _, tt := range tests {
		t.Run(tt.err.Error(), func(t *testing.T) {
			assert.Equal(t, tt.code, exitCode(fmt.Errorf("wrapped: %w", tt.err)))
		})
	}
}

func TestSendUsage(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "config.toml")
	require.NoError(t, os.WriteFile(cfg, []byte("[provisioning]\nid_scope = \"0ne00000000\"\n[runtime]\ndir = \""+dir+"\"\n"), 0o600))
	tests := []struct {
		name  string
		args  []string
		stdin string
		code  int
		msg   string
	}{
		{"property without value", []string{"--property", "novalue"}, "x", exitUsage, "NAME=VALUE"},
		{"property without name", []string{"--property", "=v"}, "x", exitUsage, "NAME=VALUE"},
		{"payload over the hub's limit", nil, strings.Repeat("x", hub.MaxTelemetrySize+1), exitUsage, "exceeds"},
		{"negative timeout", []string{"--timeout", "-1s"}, "x", exitUsage, "negative"},
		{"no agent", []string{"--property", "a=b"}, "x", exitUnavailable, "not running"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			e := &env{stdin: strings.NewReader(tt.stdin), stdout: &stdout, stderr: &stderr}
			err := runSend(context.Background(), e, append([]string{"--config", cfg}, tt.args...))
			assert.Equal(t, tt.code, exitCode(err), "%v", err)
			assert.Contains(t, err.Error()+stderr.String(), tt.msg)
		})
	}
}
