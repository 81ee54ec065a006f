package packaging_test

import (
	"path/filepath"
	"regexp"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestRecipesMatchTheMakefile keeps the Yocto and Buildroot recipes, which cannot be built
// here, in step with what is: the files they install exist, and they set the same version
// variables as `make` and build the agent without cgo, as its user in group tss.
func TestRecipesMatchTheMakefile(t *testing.T) {
	versionVar := regexp.MustCompile(`internal/version\.(\w+)=`)
	varsIn := func(path string) []string {
		var names []string
		for _, m := range versionVar.FindAllStringSubmatch(string(readFile(t, path)), -1) {
			names = append(names, m[1])
		}
		return names
	}
	makeVars := varsIn("../Makefile")
	require.NotEmpty(t, makeVars)
	packagingPath := regexp.MustCompile(`packaging/[\w./-]+`)
	recipes := []struct {
		path      string
		userInTSS *regexp.Regexp
		noCgo     string
	}{
		{"yocto/meta-unicity/recipes-core/unicity/unicity_git.bb", regexp.MustCompile(`(?s)USERADD_PARAM:\${PN} = "--system --user-group --groups tss .*? unicity"`), `export CGO_ENABLED = "0"`},
		{"buildroot/package/unicity/unicity.mk", regexp.MustCompile(`(?m)^\tunicity -1 unicity -1 \* /var/lib/unicity - tss `), "UNICITY_GO_ENV = CGO_ENABLED=0"},
	}
	for _, r := range recipes {
		t.Run(filepath.Base(r.path), func(t *testing.T) {
			text := string(readFile(t, r.path))
			assert.ElementsMatch(t, makeVars, varsIn(r.path))
			assert.Contains(t, text, "cmd/unicity")
			assert.Contains(t, text, r.noCgo)
			assert.Regexp(t, r.userInTSS, text)
			installs := packagingPath.FindAllString(text, -1)
			assert.Subset(t, installs, []string{"packaging/systemd/unicity.service", "packaging/systemd/unicity.sysusers", "packaging/systemd/unicity.tmpfiles", "packaging/config.toml"})
			for _, p := range installs {
				assert.FileExists(t, filepath.Join("..", p))
			}
		})
	}
	t.Run("buildroot external tree", func(t *testing.T) {
		assert.Contains(t, string(readFile(t, "buildroot/external.desc")), "name: UNICITY\n")
		assert.Contains(t, string(readFile(t, "buildroot/Config.in")), `"$BR2_EXTERNAL_UNICITY_PATH/package/unicity/Config.in"`)
		assert.FileExists(t, "buildroot/package/unicity/Config.in")
	})
	t.Run("yocto layer", func(t *testing.T) {
		conf := string(readFile(t, "yocto/meta-unicity/conf/layer.conf"))
		assert.Contains(t, conf, `BBFILE_COLLECTIONS += "unicity"`)
		assert.Contains(t, conf, "LAYERSERIES_COMPAT_unicity")
	})
}
