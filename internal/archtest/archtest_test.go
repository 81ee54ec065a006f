package archtest

import (
	"bufio"
	"bytes"
	"encoding/json"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const docPath = "docs/architecture.md"

// TestArchitectureDoc holds docs/architecture.md's package table to the code: one row per
// package, each listing exactly the project packages it imports, rows from the bottom up.
func TestArchitectureDoc(t *testing.T) {
	module, root := moduleOf(t)
	rows := packageTable(t, filepath.Join(root, docPath))
	actual := projectImports(t, module)

	for _, pkg := range slices.Sorted(maps.Keys(actual)) {
		imports := actual[pkg]
		row, ok := rows[pkg]
		if !ok {
			t.Errorf("%s has no row in %s", pkg, docPath)
			continue
		}
		for _, imp := range imports {
			if !slices.Contains(row.imports, imp) {
				t.Errorf("%s imports %s; its row in %s does not say so", pkg, imp, docPath)
			}
		}
		for _, imp := range row.imports {
			if !slices.Contains(imports, imp) {
				t.Errorf("%s's row in %s lists %s, which it does not import", pkg, docPath, imp)
			}
		}
	}
	for _, pkg := range slices.Sorted(maps.Keys(rows)) {
		row := rows[pkg]
		if _, ok := actual[pkg]; !ok {
			t.Errorf("%s:%d: there is no package %s", docPath, row.line, pkg)
			continue
		}
		for _, imp := range row.imports {
			if dep, ok := rows[imp]; ok && dep.order > row.order {
				t.Errorf("%s imports %s, whose row comes after it: rows run from the bottom up", pkg, imp)
			}
		}
	}
}

type row struct {
	imports []string
	order   int // position in the table
	line    int
}

var code = regexp.MustCompile("`([^`]+)`")

// packageTable reads the table under "## Packages": | `pkg` | job | `imp`, `imp` or — |.
func packageTable(t *testing.T, path string) map[string]row {
	t.Helper()
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	rows := map[string]row{}
	in := false
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "## "):
			in = line == "## Packages"
			continue
		case !in || !strings.HasPrefix(line, "| `"):
			continue
		}
		cells := strings.Split(strings.Trim(line, "|"), "|")
		require.Len(t, cells, 3, "%s:%d: a row is | package | job | imports |", path, n)
		name := code.FindStringSubmatch(cells[0])
		require.NotNil(t, name, "%s:%d: no package name", path, n)
		pkg := name[1]
		_, dup := rows[pkg]
		require.False(t, dup, "%s:%d: %s has two rows", path, n, pkg)
		r := row{order: len(rows), line: n}
		for _, m := range code.FindAllStringSubmatch(cells[2], -1) {
			r.imports = append(r.imports, m[1])
		}
		if len(r.imports) == 0 {
			require.Equal(t, "—", strings.TrimSpace(cells[2]), "%s:%d: imports are `pkg`, `pkg` or —", path, n)
		}
		rows[pkg] = r
	}
	require.NoError(t, sc.Err())
	require.Greater(t, len(rows), 10, "%s: no package table found", path)
	return rows
}

// projectImports maps every package of the module to the module packages its non-test files
// import, both relative to the module ("attest", "internal/dial").
func projectImports(t *testing.T, module string) map[string][]string {
	t.Helper()
	dec := json.NewDecoder(bytes.NewReader(goList(t, "-json", module+"/...")))
	rel := func(path string) (string, bool) {
		if path == module {
			return ".", true
		}
		return strings.CutPrefix(path, module+"/")
	}
	pkgs := map[string][]string{}
	for dec.More() {
		var p struct {
			ImportPath string
			Imports    []string
		}
		require.NoError(t, dec.Decode(&p))
		name, ok := rel(p.ImportPath)
		require.True(t, ok, "go list listed %s, outside %s", p.ImportPath, module)
		imports := []string{}
		for _, imp := range p.Imports {
			if r, ok := rel(imp); ok {
				imports = append(imports, r)
			}
		}
		pkgs[name] = imports
	}
	assert.Contains(t, pkgs, "cmd/unicity", "go list found the module's packages")
	return pkgs
}

func moduleOf(t *testing.T) (path, dir string) {
	t.Helper()
	fields := strings.Fields(string(goList(t, "-m", "-f", "{{.Path}} {{.Dir}}")))
	require.Len(t, fields, 2)
	return fields[0], fields[1]
}

func TestWithin(t *testing.T) {
	deps := []string{"github.com/google/go-tpm", "github.com/google/go-tpm-tools/simulator", "github.com/google/go-tpm/tpm2", "fmt"}
	assert.Equal(t, []string{"github.com/google/go-tpm", "github.com/google/go-tpm/tpm2"}, within(deps, "github.com/google/go-tpm"),
		"a package and those below it, not those that merely share its prefix")
	assert.Empty(t, within(deps, "github.com/unicity-iot/unicity"))
}
