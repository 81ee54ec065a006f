package main

import (
	"fmt"
	"io"
	"net/http"
	"strings"

	"github.com/unicity-iot/unicity/dps/dpstest"
)

// Statistics for fleet tests: counters since serve started and the devices' state now, as
// JSON (/v1/stats) and in Prometheus' text format (/metrics), on the admin socket and on
// --metrics-addr.

type statsJSON struct {
	DPS  dpsStatsJSON   `json:"dps"`
	Hubs []hubStatsJSON `json:"hubs"`
}

type dpsStatsJSON struct {
	Connections   int64 `json:"connections"`
	Refused       int64 `json:"refused"`
	Registrations int64 `json:"registrations"`
	Polls         int64 `json:"polls"`
	Assignments   int64 `json:"assignments"`
	Throttled     int64 `json:"throttled"`
}

type hubStatsJSON struct {
	Hub          string `json:"hub"`
	Devices      int    `json:"devices"`
	Connected    int    `json:"connected"`
	Disabled     int    `json:"disabled"`
	PendingC2D   int    `json:"pending_c2d"`
	Connections  int    `json:"connections"`
	Refused      int    `json:"refused"`
	Kicked       int    `json:"kicked"`
	Violations   int    `json:"violations"`
	Telemetry    int    `json:"telemetry"`
	C2DSent      int    `json:"c2d_sent"`
	C2DCompleted int    `json:"c2d_completed"`
	Methods      int    `json:"methods"`
}

func (a *admin) statsNow() statsJSON {
	d := a.dps.Stats()
	out := statsJSON{DPS: dpsStatsJSON{Connections: d.Connections, Refused: d.Refused, Registrations: d.Registrations,
		Polls: d.Polls, Assignments: d.Assignments, Throttled: d.Throttled}, Hubs: []hubStatsJSON{}}
	for _, h := range a.fleet.Hubs() {
		st := h.Stats()
		hs := hubStatsJSON{Hub: h.Name(), Connections: st.Connections, Refused: st.Refused, Kicked: st.Kicked,
			Violations: st.Violations, Telemetry: st.Telemetry, C2DSent: st.C2DSent, C2DCompleted: st.C2DCompleted, Methods: st.Methods}
		for _, dev := range h.Devices() {
			hs.Devices++
			hs.PendingC2D += dev.PendingC2D
			if dev.Connected {
				hs.Connected++
			}
			if dev.Status == "disabled" {
				hs.Disabled++
			}
		}
		out.Hubs = append(out.Hubs, hs)
	}
	return out
}

func (a *admin) stats(w http.ResponseWriter, _ *http.Request) { reply(w, a.statsNow(), nil) }

// metrics writes the statistics in Prometheus' text exposition format.
func (a *admin) metrics(w http.ResponseWriter, _ *http.Request) {
	s := a.statsNow()
	w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
	metric := func(name, kind, help string) {
		fmt.Fprintf(w, "# HELP unicity_emulator_%s %s\n# TYPE unicity_emulator_%s %s\n", name, help, name, kind)
	}
	for _, m := range []struct {
		name, help string
		v          int64
	}{
		{"dps_connections_total", "DPS connections accepted.", s.DPS.Connections},
		{"dps_refused_total", "DPS connections and requests refused for authentication.", s.DPS.Refused},
		{"dps_registrations_total", "DPS register requests, throttled and refused ones included.", s.DPS.Registrations},
		{"dps_polls_total", "DPS operation status requests, throttled ones included.", s.DPS.Polls},
		{"dps_assignments_total", "DPS operations that ended assigned.", s.DPS.Assignments},
		{"dps_throttled_total", "DPS 429 answers.", s.DPS.Throttled},
	} {
		metric(m.name, "counter", m.help)
		fmt.Fprintf(w, "unicity_emulator_%s %d\n", m.name, m.v)
	}
	for _, m := range []struct {
		name, kind, help string
		v                func(hubStatsJSON) int
	}{
		{"hub_devices", "gauge", "Devices in the hub's registry.", func(h hubStatsJSON) int { return h.Devices }},
		{"hub_connected_devices", "gauge", "Devices connected now.", func(h hubStatsJSON) int { return h.Connected }},
		{"hub_disabled_devices", "gauge", "Devices disabled in the registry.", func(h hubStatsJSON) int { return h.Disabled }},
		{"hub_pending_c2d_messages", "gauge", "Cloud-to-device messages not acknowledged yet.", func(h hubStatsJSON) int { return h.PendingC2D }},
		{"hub_connections_total", "counter", "CONNECTs accepted.", func(h hubStatsJSON) int { return h.Connections }},
		{"hub_refused_total", "counter", "CONNECTs refused.", func(h hubStatsJSON) int { return h.Refused }},
		{"hub_kicked_total", "counter", "Connections the hub closed: a newer one, disable, delete, move.", func(h hubStatsJSON) int { return h.Kicked }},
		{"hub_violations_total", "counter", "Connections closed for protocol misuse.", func(h hubStatsJSON) int { return h.Violations }},
		{"hub_telemetry_messages_total", "counter", "Device-to-cloud messages received.", func(h hubStatsJSON) int { return h.Telemetry }},
		{"hub_c2d_sent_total", "counter", "Cloud-to-device messages queued.", func(h hubStatsJSON) int { return h.C2DSent }},
		{"hub_c2d_completed_total", "counter", "Cloud-to-device messages acknowledged.", func(h hubStatsJSON) int { return h.C2DCompleted }},
		{"hub_methods_total", "counter", "Direct method invocations sent.", func(h hubStatsJSON) int { return h.Methods }},
	} {
		metric(m.name, m.kind, m.help)
		for _, h := range s.Hubs {
			fmt.Fprintf(w, "unicity_emulator_%s{hub=\"%s\"} %d\n", m.name, labelEscaper.Replace(h.Hub), m.v(h))
		}
	}
}

// labelEscaper escapes a Prometheus label value.
var labelEscaper = strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`)

// registrationsJSON is what 'registrations' prints.
type registrationsJSON struct {
	Count         int               `json:"count"`
	Registrations []dpstest.Attempt `json:"registrations"`
}

// registrations lists the register requests DPS received, of one device (?device=ID, its
// registration ID or device ID) or all.
func (a *admin) registrations(w http.ResponseWriter, r *http.Request) {
	device := r.URL.Query().Get("device")
	out := registrationsJSON{Registrations: []dpstest.Attempt{}}
	for _, at := range a.dps.Attempts("") {
		if device == "" || strings.EqualFold(at.RegistrationID, device) || at.DeviceID == device {
			out.Registrations = append(out.Registrations, at)
		}
	}
	out.Count = len(out.Registrations)
	reply(w, out, nil)
}

// newStatsHandler serves the statistics alone, for --metrics-addr.
func newStatsHandler(a *admin) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /metrics", a.metrics)
	mux.HandleFunc("GET /v1/stats", a.stats)
	mux.HandleFunc("GET /", func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusNotFound)
		io.WriteString(w, "see /metrics and /v1/stats\n")
	})
	return mux
}
