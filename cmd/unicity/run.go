package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/journal"

	"github.com/unicity-iot/unicity/device"
	"github.com/unicity-iot/unicity/dps"
	"github.com/unicity-iot/unicity/gateway"
	"github.com/unicity-iot/unicity/hub"
	"github.com/unicity-iot/unicity/localapi"
	"github.com/unicity-iot/unicity/storage"
)

// agentClock is the agent's wall clock; a seam for the scenarios that start in 1970.
var agentClock device.Clock = device.SystemClock{}

func runRun(ctx context.Context, e *env, args []string) error {
	fs := newFlagSet(e, "run", "[--config FILE] [--log-level LEVEL]")
	var tf tpmFlags
	tf.register(fs)
	level := logLevel{slog.LevelInfo}
	fs.Var(&level, "log-level", "`LEVEL` of the service log: debug (every DPS step and hub connection change), info (the default), warn or error")
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
	journald, _ := journal.StderrIsJournalStream()
	log := serviceLogger(e.stderr, level.Level, journald)
	for _, hc := range cfg.HostChecks(os.Geteuid()) {
		if _, err := hc.Check(); err != nil {
			return configErrorf("%w", err)
		}
	}

	prov, err := device.NewDPS(cfg)
	if err != nil {
		return configErrorf("%w", err)
	}
	hubs := device.NewHubSessions(cfg, prov.RootCAs)
	hubs.Clock = agentClock
	api, err := localapi.Listen(cfg)
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
		// A new onboarding certificate (`factory install` on the live device) is picked up
		// without a reload too.
		OnboardingPoll: device.OnboardingPoll,
		OnStatus:       statusLogger(log),
		OnCredential:   credentialLogger(log),
	}
	relay := gateway.New(agent, hubs)
	relay.Clock = agentClock
	apiServer := &localapi.Server{Agent: agent, Gateway: relay, Clock: agentClock}
	// Before the agent runs: SIGHUP's default would end the process.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	agent.Services = []func(context.Context){relay.Run, func(ctx context.Context) { apiServer.Serve(ctx, api) },
		func(ctx context.Context) { reloadOnHangup(ctx, hup, agent, log) }}
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

// reloadOnHangup has the agent load its onboarding certificate again on each SIGHUP
// (`systemctl reload unicity`, after `unicity factory install` on the live device).
func reloadOnHangup(ctx context.Context, hup <-chan os.Signal, agent *device.Agent, log *slog.Logger) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-hup:
		}
		log.Info("SIGHUP: loading the onboarding certificate again")
		agent.Reload(ctx) // a certificate it cannot use is its last error, logged as such
	}
}

// logLevel is --log-level, spelt in lower case as the README has it.
type logLevel struct{ slog.Level }

func (l *logLevel) String() string { return strings.ToLower(l.Level.String()) }

func (l *logLevel) Set(s string) error { return l.Level.UnmarshalText([]byte(s)) }

// serviceLogger logs to stderr from level up. Writing to the journal (journald), it leaves
// out the timestamps, which the journal adds itself, and starts each line with its syslog
// priority, as journald reads it (sd-daemon(3)): `journalctl -p err` shows the errors.
func serviceLogger(w io.Writer, level slog.Level, journald bool) *slog.Logger {
	opts := &slog.HandlerOptions{Level: level}
	if !journald {
		return slog.New(slog.NewTextHandler(w, opts))
	}
	opts.ReplaceAttr = func(groups []string, a slog.Attr) slog.Attr {
		if len(groups) == 0 && a.Key == slog.TimeKey {
			return slog.Attr{}
		}
		return a
	}
	out := &prefixWriter{w: w}
	return slog.New(journalHandler{slog.NewTextHandler(out, opts), out})
}

// journalHandler is a text handler whose lines start with their priority ("<3>" for
// errors).
type journalHandler struct {
	slog.Handler // writing to out
	out          *prefixWriter
}

func (h journalHandler) Handle(ctx context.Context, r slog.Record) error {
	h.out.mu.Lock()
	defer h.out.mu.Unlock()
	h.out.prefix = journalPrefix(r.Level)
	return h.Handler.Handle(ctx, r)
}

func (h journalHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return journalHandler{h.Handler.WithAttrs(attrs), h.out}
}

func (h journalHandler) WithGroup(name string) slog.Handler {
	return journalHandler{h.Handler.WithGroup(name), h.out}
}

// prefixWriter writes each line the handler formats (one Write per record) after prefix.
type prefixWriter struct {
	mu     sync.Mutex
	w      io.Writer
	prefix string
}

func (p *prefixWriter) Write(b []byte) (int, error) {
	if _, err := io.WriteString(p.w, p.prefix+string(b)); err != nil {
		return 0, err
	}
	return len(b), nil
}

// journalPrefix is the sd-daemon(3) prefix of a line logged at level.
func journalPrefix(level slog.Level) string {
	p := journal.PriDebug
	switch {
	case level >= slog.LevelError:
		p = journal.PriErr
	case level >= slog.LevelWarn:
		p = journal.PriWarning
	case level >= slog.LevelInfo:
		p = journal.PriInfo
	}
	return fmt.Sprintf("<%d>", p)
}

// statusLogger logs each new status line, each new error at warning level (at error level
// when it stopped the agent), and an assignment that could be stored at last.
func statusLogger(log *slog.Logger) func(device.Status) {
	var last device.Status
	return func(s device.Status) {
		if s.LastError != "" && s.LastError != last.LastError {
			level := slog.LevelWarn
			if s.Phase == device.PhaseStopped {
				level = slog.LevelError
			}
			log.Log(context.Background(), level, s.LastError, "phase", s.Phase)
		}
		if s.StoreError == "" && last.StoreError != "" {
			log.Info("the assignment in use is stored now", "phase", s.Phase)
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

// credentialLogger logs a change of the hub's credential, with the thumbprints an operator
// matches against the hub's and DPS's records.
func credentialLogger(log *slog.Logger) func(device.CredentialEvent) {
	return func(ev device.CredentialEvent) { logCredential(log, ev) }
}

func logCredential(log *slog.Logger, ev device.CredentialEvent) {
	switch ev.Kind {
	case device.EventIssued:
		attrs := []any{"event", ev.Kind, "sha256_thumbprint", ev.Thumbprint, "not_after", ev.NotAfter.UTC().Format(time.RFC3339), "key", ev.Key}
		if ev.Replaced != "" {
			attrs = append(attrs, "replaced", ev.Replaced)
		}
		log.Info("DPS issued an operational certificate; the hub is reached with it", attrs...)
	case device.EventRolled:
		log.Info("DPS accepted the new onboarding certificate; the device's state is bound to it now", "event", ev.Kind, "sha256_thumbprint", ev.Thumbprint, "replaced", ev.Replaced)
	case device.EventRollRefused:
		log.Warn("the new onboarding certificate is not accepted yet ("+ev.Reason+"); the one before it stays in force", "event", ev.Kind, "sha256_thumbprint", ev.Thumbprint, "in_force", ev.Replaced)
	case device.EventFellBack:
		log.Warn("the operational certificate cannot be used ("+ev.Reason+"); registering with DPS for a new one with the onboarding identity",
			"event", ev.Kind, "sha256_thumbprint", ev.Replaced)
	case device.EventRenewed:
		log.Info("renewed the operational certificate; the old key is destroyed", "event", ev.Kind, "via", ev.Via,
			"sha256_thumbprint", ev.Thumbprint, "replaced", ev.Replaced, "not_after", ev.NotAfter.UTC().Format(time.RFC3339), "key", ev.Key)
	case device.EventRenewalFailed:
		log.Warn("renewing the operational certificate failed ("+ev.Reason+"); the certificate in force stays, and the agent tries again",
			"event", ev.Kind, "via", ev.Via, "sha256_thumbprint", ev.Replaced, "not_after", ev.NotAfter.UTC().Format(time.RFC3339))
	}
}
