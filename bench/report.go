package bench

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
)

// Figure is one measured quantity: the median of its samples, with their min and max.
type Figure struct {
	Name    string    `json:"name"`
	Unit    string    `json:"unit"`
	Median  float64   `json:"median"`
	Min     float64   `json:"min"`
	Max     float64   `json:"max"`
	Samples []float64 `json:"samples"`
	// Target is the goal in words ("<= 100"), empty when there is none; Met says whether
	// the median reaches it.
	Target string `json:"target,omitempty"`
	Met    *bool  `json:"met,omitempty"`
	Note   string `json:"note,omitempty"`
}

// Machine describes where the figures were measured.
type Machine struct {
	CPU    string `json:"cpu"`
	NProc  int    `json:"nproc"`
	Load   string `json:"load"` // /proc/loadavg at the start and the end of the run
	Kernel string `json:"kernel"`
	Go     string `json:"go"`
}

// Report is the result of a benchmark run.
type Report struct {
	Date time.Time `json:"date"`
	// Agent is what `unicity version` says of the measured binary.
	Agent    string   `json:"agent"`
	Machine  Machine  `json:"machine"`
	Options  Options  `json:"options"`
	Elapsed  string   `json:"elapsed"`
	Figures  []Figure `json:"figures"`
	Notes    []string `json:"notes,omitempty"`
	Failures []string `json:"failures,omitempty"` // scenarios that could not run
}

// Figure returns the figure called name, or nil.
func (r *Report) Figure(name string) *Figure {
	for i := range r.Figures {
		if r.Figures[i].Name == name {
			return &r.Figures[i]
		}
	}
	return nil
}

// add records a figure from its samples; target compares the median ("<=" or "==" and a
// value) when not empty.
func (r *Report) add(name, unit string, samples []float64, cmp string, target float64, note string) *Figure {
	f := Figure{Name: name, Unit: unit, Samples: samples, Note: note}
	if len(samples) > 0 {
		s := slices.Clone(samples)
		slices.Sort(s)
		f.Min, f.Max = s[0], s[len(s)-1]
		if n := len(s); n%2 == 1 {
			f.Median = s[n/2]
		} else {
			f.Median = (s[n/2-1] + s[n/2]) / 2
		}
	}
	if cmp != "" {
		f.Target = cmp + " " + formatValue(target)
		met := len(samples) > 0
		switch cmp {
		case "<=":
			met = met && f.Median <= target
		case "==":
			met = met && f.Median == target && f.Min == f.Max
		}
		f.Met = &met
	}
	r.Figures = append(r.Figures, f)
	return &r.Figures[len(r.Figures)-1]
}

func (r *Report) note(format string, a ...any) { r.Notes = append(r.Notes, fmt.Sprintf(format, a...)) }

func (r *Report) fail(scenario string, err error) {
	r.Failures = append(r.Failures, fmt.Sprintf("%s: %v", scenario, err))
}

func formatValue(v float64) string {
	switch {
	case v == math.Trunc(v) && math.Abs(v) < 1e15:
		return fmt.Sprintf("%d", int64(v))
	case math.Abs(v) >= 100:
		return fmt.Sprintf("%.0f", v)
	case math.Abs(v) >= 10:
		return fmt.Sprintf("%.1f", v)
	case math.Abs(v) >= 0.1:
		return fmt.Sprintf("%.2f", v)
	default:
		return fmt.Sprintf("%.3g", v)
	}
}

// WriteTable prints the report as one table, then its notes and failures.
func (r *Report) WriteTable(w io.Writer) error {
	fmt.Fprintf(w, "unicity bench, %s: %s\n%s, %d CPUs, load %s\n\n", r.Date.UTC().Format("2006-01-02 15:04 MST"),
		r.Agent, r.Machine.CPU, r.Machine.NProc, r.Machine.Load)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "figure\tunit\tmedian\tmin\tmax\truns\ttarget\t\t")
	for _, f := range r.Figures {
		ok := ""
		if f.Met != nil {
			ok = map[bool]string{true: "ok", false: "MISSED"}[*f.Met]
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%s\t%s\t\n", f.Name, f.Unit, formatValue(f.Median),
			formatValue(f.Min), formatValue(f.Max), len(f.Samples), f.Target, ok)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, f := range r.Figures {
		if f.Note != "" {
			fmt.Fprintf(w, "  %s: %s\n", f.Name, f.Note)
		}
	}
	for _, n := range r.Notes {
		fmt.Fprintf(w, "note: %s\n", n)
	}
	for _, f := range r.Failures {
		fmt.Fprintf(w, "FAILED: %s\n", f)
	}
	fmt.Fprintf(w, "elapsed %s\n", r.Elapsed)
	return nil
}

// WriteMarkdown writes the figures as a Markdown table, for the README.
func (r *Report) WriteMarkdown(w io.Writer) error {
	fmt.Fprintf(w, "Measured %s on %s (%d CPUs, load %s); %s; the run took %s.\n\n",
		r.Date.UTC().Format("2006-01-02 15:04 MST"), r.Machine.CPU, r.Machine.NProc, r.Machine.Load, r.Agent, r.Elapsed)
	fmt.Fprintln(w, "| figure | unit | median | min | max | runs | target |")
	fmt.Fprintln(w, "|---|---|--:|--:|--:|--:|---|")
	for _, f := range r.Figures {
		target := f.Target
		if f.Met != nil {
			target += map[bool]string{true: " ✓", false: " **missed**"}[*f.Met]
		}
		if _, err := fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %d | %s |\n", f.Name, f.Unit, formatValue(f.Median),
			formatValue(f.Min), formatValue(f.Max), len(f.Samples), strings.TrimSpace(target)); err != nil {
			return err
		}
	}
	return nil
}

// WriteJSON writes the report to path.
func (r *Report) WriteJSON(path string) error {
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(data, '\n'), 0o644)
}

// machine describes this computer from /proc.
func machine() Machine {
	m := Machine{CPU: "unknown"}
	if data, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(data), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	if data, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(data))
	}
	m.Load = loadAvg()
	return m
}

// loadAvg is the 1, 5 and 15 minute load averages.
func loadAvg() string {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(data))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}
