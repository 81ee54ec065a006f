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
	"syscall"
	"time"

	"github.com/unicity-iot/unicity/dps/dpstest"
	"github.com/unicity-iot/unicity/hub/hubtest"
)

// factoryEnrollment is the group enrollment of the factory CA.
const factoryEnrollment = "factory"

// serveHelp is what serve --help says beyond its flags.
const serveHelp = `Serves DPS and the IoT hubs until interrupted, printing one JSON line once listening.

Each hub has a loopback address of its own (127.X.Y.2, .3, …, drawn for this directory),
listens there on 8883 (MQTT) and 443 (WebSocket; port 443 takes root or
CAP_NET_BIND_SERVICE, else a free port), and is named by that address, without a port, as
Azure names hubs. Where that cannot be done (no such loopback address, or --hub-host) a hub
listens on a free port of 127.0.0.1 and is named localhost:PORT (HOST:PORT).

Kept in DIR/state.jsonl across restarts, even a kill: the hubs' registries (credentials,
enabled or disabled), twins with their versions, cloud-to-device messages not yet
acknowledged, the sessions of CleanSession 0 devices, the last 10000 telemetry messages
per hub; DPS's registration records and its last 10000 register requests; and the
addresses of DPS and the hubs, which a restart listens on again. Not kept: DPS operations
in progress (the device registers again) and the connections themselves. Delete the file
to start from no devices.`

func runServe(ctx context.Context, e *env, args []string) error {
	fs, dir := newFlags("serve")
	dpsAddr := fs.String("dps-addr", "", "DPS listen `address`: MQTT/TLS, MQTT over WebSocket and HTTPS (REST) (default: the last serve's, else a free port of 127.0.0.1)")
	dpsWSAddr := fs.String("dps-ws-addr", "", "DPS MQTT-over-WebSocket and HTTPS (REST) listen `address` (\"-\": none; default: the last serve's, else a free port of 127.0.0.1)")
	var hubAddrs, hubWSAddrs, names multiFlag
	fs.Var(&hubAddrs, "hub-addr", "IoT Hub MQTT/TLS listen `address`, once per hub; a host alone listens on 8883 (default: the last serve's, else a loopback address of the hub's own)")
	fs.Var(&hubWSAddrs, "hub-ws-addr", "IoT Hub WebSocket listen `address`, once per hub in the same order (\"-\": none; default: 443 of the hub's address, else a free port)")
	hubs := fs.Int("hubs", 0, "number of hubs (default: one per --hub-addr, at least 1)")
	fs.Var(&names, "server-name", "extra host `name` for the server certificates (repeatable)")
	hubHost := fs.String("hub-host", "", "`host` devices reach the hubs by (a LAN name): hubs listen on free ports and DPS assigns host:port (host alone on port 8883)")
	retryAfter := fs.Int("retry-after", int(dpstest.DefaultRetryAfter/time.Second), "retry-after `seconds` DPS announces while assigning, as Azure does; at least 2 with the default --poll-limit (a client that obeys less would poll faster than the limit allows)")
	assignDelay := fs.Duration("assign-delay", 0, "how long after a register request DPS completes the assignment")
	quota := fs.String("quota", "", "DPS registrations per minute, `N/min` (default: unlimited)")
	pollLimit := fs.Int("poll-limit", dpstest.DefaultPollLimit, "DPS polls one device may send per 10 s before 429 (`N`; 0: unlimited)")
	unknown := fs.String("unknown-device", "connack", "how DPS refuses unenrolled devices and bad credentials: `connack` (return code 5) or 401 (a response)")
	metricsAddr := fs.String("metrics-addr", "", "also serve statistics over HTTP on this `address`: /metrics (Prometheus text format) and /v1/stats (JSON)")
	verbose := fs.Bool("verbose", false, "trace DPS connections and requests on stderr")
	if err := parse(e, fs, "--dir DIR [--dps-addr ADDR] [--hub-addr ADDR]... [--hubs N] [--hub-host HOST] [--retry-after S] [--assign-delay D] [--quota N/min] [--metrics-addr ADDR]\n\n"+serveHelp, args); err != nil {
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

	// One emulator per directory: the state file has one writer.
	lock, err := lockDir(d.path)
	if err != nil {
		return err
	}
	defer lock.Close()
	st, saved, err := openStore(d.file(stateFile))
	if err != nil {
		return err
	}
	defer st.close()
	if saved.skipped > 0 {
		fmt.Fprintf(e.stderr, "unicity-emulator serve: %s: %d unreadable lines dropped (a write cut short)\n", d.file(stateFile), saved.skipped)
	}
	var recorded layoutRecord
	if saved.layout != nil {
		recorded = *saved.layout
	}

	lay := hubLayout{addrs: hubAddrs, wsAddrs: hubWSAddrs, host: *hubHost, recorded: recorded.Hubs, warn: e.stderr}
	listeners, err := lay.listen(n)
	if err != nil {
		return err
	}
	var (
		fleetHubs []*hubtest.Hub
		layout    = layoutRecord{}
	)
	defer func() {
		for _, h := range fleetHubs {
			h.Close()
		}
	}()
	for i, hl := range listeners {
		h, err := hubtest.NewNamed(hl.host, hl.l, hl.ws, hubtest.WithCA(d.serverCA), hubtest.WithHostNames(names...), hubtest.WithJournal(st))
		if err != nil {
			for _, rest := range listeners[i:] {
				rest.close()
			}
			return err
		}
		fleetHubs = append(fleetHubs, h)
		if err := h.Restore(saved.devices[h.Name()], saved.telemetry[h.Name()]); err != nil {
			return fmt.Errorf("%s: %w", d.file(stateFile), err)
		}
		delete(saved.devices, h.Name())
		layout.Hubs = append(layout.Hubs, hl.record())
	}
	for name, devs := range saved.devices {
		fmt.Fprintf(e.stderr, "unicity-emulator serve: %d devices of hub %s, which this serve does not serve, stay in %s\n", len(devs), name, d.file(stateFile))
	}
	fleet := hubtest.NewFleet(fleetHubs...)

	cfg := dpstest.DefaultConfig()
	cfg.IDScope, cfg.Addr, cfg.WebSocketAddr = d.cfg.IDScope, *dpsAddr, *dpsWSAddr
	if cfg.Addr == "" {
		cfg.Addr = recorded.DPS // "" is a free port
	}
	if cfg.WebSocketAddr == "" {
		cfg.WebSocketAddr = recorded.DPSWS
	}
	cfg.ServerCA, cfg.FactoryCA, cfg.IssuingCA = d.serverCA, d.factoryCA, d.issuingCA
	cfg.ServerNames = names
	if *hubHost != "" {
		cfg.ServerNames = append([]string{*hubHost}, names...) // devices reach DPS by the same host
	}
	cfg.NoFactoryEnrollment = true
	cfg.Hubs = fleet.Names()
	cfg.RetryAfter = announced
	cfg.AssignDelay = *assignDelay
	cfg.RegistrationsPerMinute = perMinute
	cfg.PollLimit = *pollLimit
	cfg.Registrar = fleet
	cfg.Journal = st
	cfg.UnknownDevice = refusal
	if *verbose {
		cfg.Logger = slog.New(slog.NewTextHandler(e.stderr, nil))
	}
	dps, err := dpstest.New(cfg)
	if err != nil {
		return err
	}
	dps.Restore(saved.regs, saved.attempts)
	if err := dps.AddGroup(dpstest.Group{ID: factoryEnrollment, CA: d.factoryCA.Certificate,
		Policy: dpstest.Policy{Allocate: fleet.Allocate}}); err != nil {
		return err
	}
	enrolled, err := loadEnrollments(d.file(enrollmentsFile))
	if err != nil {
		return err
	}
	enrolled.ctx = ctx
	if err := enrolled.applyAll(dps, fleet.Allocate); err != nil {
		return err
	}
	credPolicies, err := loadPolicies(d.file(policiesFile))
	if err != nil {
		return err
	}
	if err := credPolicies.applyAll(dps); err != nil {
		return err
	}
	fleet.SetIssuer(dps)
	if err := dps.Start(); err != nil {
		if *dpsAddr == "" && recorded.DPS != "" {
			return fmt.Errorf("%w (devices are configured with DPS's address: free it, or choose another with --dps-addr)", err)
		}
		return err
	}
	defer dps.Close()
	layout.DPS, layout.DPSWS = dps.Addr(), dps.WebSocketAddr()
	if err := st.saveLayout(layout); err != nil {
		return err
	}

	adminL, err := listenAdmin(d.file(adminSocketFile))
	if err != nil {
		return err
	}
	a := &admin{fleet: fleet, dps: dps, enrollments: enrolled, policies: credPolicies}
	srv := &http.Server{Handler: newAdminHandler(a), ReadHeaderTimeout: 10 * time.Second}
	served := make(chan error, 2)
	go func() { served <- srv.Serve(adminL) }()
	defer os.Remove(d.file(adminSocketFile))
	defer srv.Close()

	line := map[string]any{
		"id_scope":     dps.IDScope(),
		"dps":          dps.Addr(),
		"dps_ws":       dps.WebSocketAddr(),
		"hub":          fleet.Names()[0],
		"hubs":         fleet.Names(),
		"hubs_ws":      wsAddrs(layout.Hubs),
		"trust_bundle": absPath(d.file(trustBundleFile)),
		"admin_socket": absPath(d.file(adminSocketFile)),
	}
	if *metricsAddr != "" {
		ml, err := net.Listen("tcp", *metricsAddr)
		if err != nil {
			return fmt.Errorf("cannot listen for statistics: %w", err)
		}
		metrics := &http.Server{Handler: newStatsHandler(a), ReadHeaderTimeout: 10 * time.Second}
		go func() { served <- metrics.Serve(ml) }()
		defer metrics.Close()
		line["metrics"] = "http://" + ml.Addr().String() + "/metrics"
	}
	if err := printJSON(e.stdout, line); err != nil {
		return err
	}
	select {
	case <-ctx.Done():
		return nil
	case <-st.failed:
		return st.failure()
	case err := <-served:
		return fmt.Errorf("admin socket: %w", err)
	}
}

func wsAddrs(hubs []hubLayoutRecord) []string {
	out := make([]string, len(hubs))
	for i, h := range hubs {
		out[i] = h.WS
	}
	return out
}

// lockDir takes the emulator directory for this process, or says who has it.
func lockDir(dir string) (*os.File, error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("an emulator is already serving %s", dir)
		}
		return nil, fmt.Errorf("cannot lock %s: %w", dir, err)
	}
	return f, nil
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
