package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/unicity-iot/unicity/dps/dpstest"
	"github.com/unicity-iot/unicity/hub/hubtest"
)

// factoryEnrollment is the group enrollment of the factory CA.
const factoryEnrollment = "factory"

func runServe(ctx context.Context, e *env, args []string) error {
	fs, dir := newFlags("serve")
	dpsAddr := fs.String("dps-addr", "127.0.0.1:0", "DPS MQTT/TLS listen `address`")
	dpsWSAddr := fs.String("dps-ws-addr", "127.0.0.1:0", "DPS MQTT-over-WebSocket listen `address` (\"-\": none)")
	var hubAddrs, hubWSAddrs, names multiFlag
	fs.Var(&hubAddrs, "hub-addr", "IoT Hub MQTT/TLS listen `address`, once per hub (default 127.0.0.1:0)")
	fs.Var(&hubWSAddrs, "hub-ws-addr", "IoT Hub WebSocket listen `address`, once per hub in the same order (default 127.0.0.1:0; \"-\": none)")
	hubs := fs.Int("hubs", 0, "number of hubs (default: one per --hub-addr, at least 1)")
	fs.Var(&names, "server-name", "extra host `name` for the server certificates (repeatable)")
	hubHost := fs.String("hub-host", "localhost", "`host` devices reach the hubs by: DPS assigns host:port (host alone on port 8883)")
	retryAfter := fs.Int("retry-after", int(dpstest.DefaultRetryAfter/time.Second), "retry-after `seconds` DPS announces while assigning, as Azure does; at least 2 with the default --poll-limit (a client that obeys less would poll faster than the limit allows)")
	assignDelay := fs.Duration("assign-delay", 0, "how long after a register request DPS completes the assignment")
	quota := fs.String("quota", "", "DPS registrations per minute, `N/min` (default: unlimited)")
	pollLimit := fs.Int("poll-limit", dpstest.DefaultPollLimit, "DPS polls one device may send per 10 s before 429 (`N`; 0: unlimited)")
	unknown := fs.String("unknown-device", "connack", "how DPS refuses unenrolled devices and bad credentials: `connack` (return code 5) or 401 (a response)")
	verbose := fs.Bool("verbose", false, "trace DPS connections and requests on stderr")
	if err := parse(e, fs, "--dir DIR [--dps-addr ADDR] [--hub-addr ADDR]... [--hubs N] [--hub-host HOST] [--retry-after S] [--assign-delay D] [--quota N/min]", args); err != nil {
		return err
	}
	perMinute, err := parseQuota(*quota)
	if err != nil {
		return usageErrorf("serve: --quota: %v", err)
	}
	n := max(*hubs, len(hubAddrs), 1)
	if *hubs > 0 && len(hubAddrs) > *hubs {
		return usageErrorf("serve: %d --hub-addr for --hubs %d", len(hubAddrs), *hubs)
	}
	if len(hubWSAddrs) > n {
		return usageErrorf("serve: more --hub-ws-addr than hubs")
	}
	refusal, ok := map[string]dpstest.UnknownDevice{"connack": dpstest.RefuseConnack, "401": dpstest.Refuse401}[*unknown]
	if !ok {
		return usageErrorf("serve: --unknown-device is connack or 401, not %q", *unknown)
	}
	if *retryAfter < 0 || *assignDelay < 0 || *pollLimit < 0 {
		return usageErrorf("serve: --retry-after, --assign-delay and --poll-limit cannot be negative")
	}
	d, err := loadDir(*dir)
	if err != nil {
		return err
	}
	announced := time.Duration(*retryAfter) * time.Second
	if least := dpstest.MinRetryAfter(*pollLimit); announced < least {
		fmt.Fprintf(e.stderr, "unicity-emulator serve: --retry-after %d raised to %d: a client that obeys less polls faster than --poll-limit %d per %v allows (--poll-limit 0 lifts both)\n",
			*retryAfter, int(least/time.Second), *pollLimit, dpstest.PollWindow)
		announced = least
	}

	var (
		fleetHubs []*hubtest.Hub
		hubWS     []string
	)
	defer func() {
		for _, h := range fleetHubs {
			h.Close()
		}
	}()
	for i := range n {
		h, ws, err := startHub(d, *hubHost, at(hubAddrs, i), at(hubWSAddrs, i), names)
		if err != nil {
			return err
		}
		fleetHubs, hubWS = append(fleetHubs, h), append(hubWS, ws)
	}
	fleet := hubtest.NewFleet(fleetHubs...)

	cfg := dpstest.DefaultConfig()
	cfg.IDScope, cfg.Addr, cfg.WebSocketAddr = d.cfg.IDScope, *dpsAddr, *dpsWSAddr
	cfg.ServerCA, cfg.FactoryCA, cfg.IssuingCA = d.serverCA, d.factoryCA, d.issuingCA
	cfg.ServerNames = append([]string{*hubHost}, names...) // devices reach DPS by the same host
	cfg.NoFactoryEnrollment = true
	cfg.Hubs = fleet.Names()
	cfg.RetryAfter = announced
	cfg.AssignDelay = *assignDelay
	cfg.RegistrationsPerMinute = perMinute
	cfg.PollLimit = *pollLimit
	cfg.Registrar = fleet
	cfg.UnknownDevice = refusal
	if *verbose {
		cfg.Logger = slog.New(slog.NewTextHandler(e.stderr, nil))
	}
	dps, err := dpstest.New(cfg)
	if err != nil {
		return err
	}
	if err := dps.AddGroup(dpstest.Group{ID: factoryEnrollment, CA: d.factoryCA.Certificate,
		Policy: dpstest.Policy{Allocate: fleet.Allocate}}); err != nil {
		return err
	}
	saved, err := loadEnrollments(d.file(enrollmentsFile))
	if err != nil {
		return err
	}
	if err := saved.applyAll(dps, fleet.Allocate); err != nil {
		return err
	}
	if err := dps.Start(); err != nil {
		return err
	}
	defer dps.Close()

	adminL, err := listenAdmin(d.file(adminSocketFile))
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: newAdminHandler(&admin{fleet: fleet, dps: dps, enrollments: saved}), ReadHeaderTimeout: 10 * time.Second}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(adminL) }()
	defer os.Remove(d.file(adminSocketFile))
	defer srv.Close()

	if err := printJSON(e.stdout, map[string]any{
		"id_scope":     dps.IDScope(),
		"dps":          dps.Addr(),
		"dps_ws":       dps.WebSocketAddr(),
		"hub":          fleet.Names()[0],
		"hubs":         fleet.Names(),
		"hubs_ws":      hubWS,
		"trust_bundle": absPath(d.file(trustBundleFile)),
		"admin_socket": absPath(d.file(adminSocketFile)),
	}); err != nil {
		return err
	}
	select {
	case <-ctx.Done():
		return nil
	case err := <-served:
		return fmt.Errorf("admin socket: %w", err)
	}
}

// startHub serves one hub and returns it with its WebSocket address ("" when none).
func startHub(d *emulatorDir, host, addr, wsAddr string, names []string) (*hubtest.Hub, string, error) {
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	if wsAddr == "" {
		wsAddr = "127.0.0.1:0"
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, "", fmt.Errorf("cannot listen for IoT Hub: %w", err)
	}
	var (
		ws     net.Listener
		wsName string
	)
	if wsAddr != "-" {
		if ws, err = net.Listen("tcp", wsAddr); err != nil {
			l.Close()
			return nil, "", fmt.Errorf("cannot listen for IoT Hub WebSocket: %w", err)
		}
		wsName = ws.Addr().String()
	}
	h, err := hubtest.NewNamed(host, l, ws, hubtest.WithCA(d.serverCA), hubtest.WithHostNames(names...))
	if err != nil {
		l.Close()
		if ws != nil {
			ws.Close()
		}
		return nil, "", err
	}
	return h, wsName, nil
}

// listenAdmin listens on the admin socket, replacing one left by a crashed emulator but not
// one that a running emulator still answers on.
func listenAdmin(path string) (net.Listener, error) {
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("an emulator is already serving %s", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("cannot listen on the admin socket: %w", err)
	}
	// The socket controls every device: only its owner may connect.
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}

// parseQuota reads "N/min" or "N".
func parseQuota(s string) (int, error) {
	if s == "" {
		return 0, nil
	}
	v, ok := strings.CutSuffix(s, "/min")
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 || (!ok && strings.Contains(s, "/")) {
		return 0, fmt.Errorf("%q is not a positive number per minute (N/min)", s)
	}
	return n, nil
}

func at(s []string, i int) string {
	if i < len(s) {
		return s[i]
	}
	return ""
}
