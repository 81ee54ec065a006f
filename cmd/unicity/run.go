package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"time"

	"github.com/unicity-iot/unicity/device"
	"github.com/unicity-iot/unicity/dps"
	"github.com/unicity-iot/unicity/hub"
	"github.com/unicity-iot/unicity/storage"
)

// agentClock is the agent's wall clock; a seam for the scenarios that start in 1970.
var agentClock device.Clock = device.SystemClock{}

func runRun(ctx context.Context, e *env, args []string) error {
	fs := newFlagSet(e, "run", "[--config FILE] [--log-level LEVEL]")
	var tf tpmFlags
	tf.register(fs)
	var level slog.Level
	fs.TextVar(&level, "log-level", slog.LevelInfo, "`LEVEL` of the service log: debug (every DPS step and hub connection change), info, warn or error")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	cfg, err := tf.loadConfig(fs, false)
	if err != nil {
		return err
	}
	if tf.tpm != "" {
		cfg.TPM.Device = tf.tpm
	}
	log := serviceLogger(e.stderr, level)

	prov, err := device.NewDPS(cfg)
	if err != nil {
		return configErrorf("%w", err)
	}
	hubs := device.NewHubSessions(cfg, prov.RootCAs)
	hubs.Clock = agentClock
	api, err := device.ListenAPI(cfg)
	if err != nil {
		return err
	}
	sd := device.Systemd{}
	agent := &device.Agent{
		Config:      cfg,
		Store:       storage.New(cfg.State.Dir),
		Provisioner: prov,
		Hub:         hubs,
		Clock:       agentClock,
		Notifier:    sd,
		Watchdog:    sd.WatchdogPeriod(),
		API:         api,
		OnStatus:    statusLogger(log),
	}
	agent.Gateway = device.NewGateway(agent, hubs)
	prov.Clock = agentClock
	prov.Progress = func(p dps.Progress) {
		log.Debug("dps: "+p.Message, "wait", p.Wait, "err", p.Err)
		agent.Progress(p.Message, p.Wait, p.Err)
	}
	hubs.OnState = func(s hub.State) {
		log.Debug("hub connection", "connected", s.Connected, "transport", s.Transport, "failures", s.Failures, "retry", s.Retry, "err", s.Err)
		if s.Connected {
			agent.Progress(fmt.Sprintf("connected to the hub over %s", s.Transport), 0, nil)
		} else if s.Err != nil && s.Retry > 0 {
			agent.Progress(fmt.Sprintf("connection to the hub lost; reconnecting in %s", s.Retry.Round(time.Second)), s.Retry, s.Err)
		}
	}
	log.Info("starting", "config", cfg.Path, "state", cfg.State.Dir, "runtime", cfg.Runtime.Dir)
	log.Debug("identity", "attestation", cfg.Attestation.Method, "registration_id", cfg.Provisioning.RegistrationID,
		"identity_cert", cfg.Attestation.IdentityCert, "identity_key", cfg.Attestation.IdentityKey,
		"symmetric_key", cfg.Attestation.SymmetricKey, "symmetric_key_group", cfg.Attestation.SymmetricKeyGroup)
	if err := agent.Run(ctx); err != nil {
		return configErrorf("%w", err)
	}
	log.Info("stopped")
	return nil
}

// serviceLogger logs to stderr from level up; under systemd (JOURNAL_STREAM set) without
// timestamps, which the journal adds itself.
func serviceLogger(w io.Writer, level slog.Level) *slog.Logger {
	opts := &slog.HandlerOptions{Level: level}
	if os.Getenv("JOURNAL_STREAM") != "" {
		opts.ReplaceAttr = func(groups []string, a slog.Attr) slog.Attr {
			if len(groups) == 0 && a.Key == slog.TimeKey {
				return slog.Attr{}
			}
			return a
		}
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// statusLogger logs each new status line, and each new error at warning level.
func statusLogger(log *slog.Logger) func(device.Status) {
	var last device.Status
	return func(s device.Status) {
		if s.LastError != "" && s.LastError != last.LastError {
			log.Warn(s.LastError, "phase", s.Phase)
		}
		if s.Message != last.Message || s.Phase != last.Phase {
			attrs := []any{"phase", s.Phase}
			if !s.NextRetry.IsZero() {
				attrs = append(attrs, "next_retry", s.NextRetry.UTC().Format(time.RFC3339))
			}
			log.Info(s.Message, attrs...)
		}
		last = s
	}
}
