package cli_test

import (
	"bytes"
	"context"
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/unicity-iot/unicity/internal/cli"
)

func TestDispatch(t *testing.T) {
	var ran []string
	record := func(name string) func(context.Context, *bytes.Buffer, []string) error {
		return func(_ context.Context, _ *bytes.Buffer, args []string) error {
			ran = append(ran, name+" "+args[0])
			return nil
		}
	}
	cmds := []cli.Command[*bytes.Buffer]{
		{Name: "run", Summary: "the service", Run: record("run")},
		{Name: "factory", Summary: "factory line", Sub: []cli.Command[*bytes.Buffer]{
			{Name: "keygen", Summary: "create the key", Run: record("keygen")},
		}},
	}
	tests := []struct {
		args           []string
		usage          bool
		ran            string
		stdout, stderr string
	}{
		{args: []string{"run", "x"}, ran: "run x"},
		{args: []string{"factory", "keygen", "y"}, ran: "keygen y"},
		{args: nil, usage: true, stderr: "Usage: prog <command>"},
		{args: []string{"--help"}, stdout: "  factory  factory line"},
		{args: []string{"factory", "help"}, stdout: "Usage: prog factory <command>"},
		{args: []string{"bogus"}, usage: true, stderr: "  run      the service"},
		{args: []string{"factory"}, usage: true, stderr: "  keygen  create the key"},
	}
	for _, tt := range tests {
		ran = nil
		var stdout, stderr bytes.Buffer
		err := cli.Dispatch(context.Background(), &stdout, &stdout, &stderr, "prog", cmds, tt.args)
		assert.Equal(t, tt.usage, cli.IsUsage(err), "%q: %v", tt.args, err)
		if !tt.usage {
			require.NoError(t, err, "%q", tt.args)
		}
		if tt.ran != "" {
			assert.Equal(t, []string{tt.ran}, ran, "%q", tt.args)
		}
		assert.Contains(t, stdout.String(), tt.stdout, "%q", tt.args)
		assert.Contains(t, stderr.String(), tt.stderr, "%q", tt.args)
	}
}

// TestUnknownCommand names the word that is wrong, and where to look.
func TestUnknownCommand(t *testing.T) {
	cmds := []cli.Command[*bytes.Buffer]{{Name: "factory", Sub: []cli.Command[*bytes.Buffer]{{Name: "keygen"}}}}
	for want, args := range map[string][]string{
		`unknown command "bogus" (see 'prog --help')`:         {"bogus"},
		`unknown command "bogus" (see 'prog factory --help')`: {"factory", "bogus"},
	} {
		var out bytes.Buffer
		err := cli.Dispatch(context.Background(), &out, &out, &out, "prog", cmds, args)
		assert.EqualError(t, err, want)
	}
}

func TestUsageErrorWraps(t *testing.T) {
	base := errors.New("bad flag")
	err := &cli.UsageError{Err: base}
	assert.ErrorIs(t, err, base)
	assert.True(t, cli.IsUsage(errors.Join(errors.New("context"), cli.Usagef("missing --dir"))))
	assert.False(t, cli.IsUsage(base))
}
