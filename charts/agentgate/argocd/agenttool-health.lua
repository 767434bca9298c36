-- Argo CD health of an agentgate.dev/AgentTool (resource.customizations.health.agentgate.dev_AgentTool).
-- Written for Lua 5.1, the dialect of Argo CD's gopher-lua; tests/health.rs runs it on objects
-- the operator wrote.
--   Progressing  the operator has not checked the current spec yet
--   Healthy      Ready: endpoint available and credentials present
--   Degraded     not Ready: jobs that require the tool wait (the Ready condition says why)
local hs = {}

local status = obj.status
local generation = obj.metadata.generation
if status == nil or status.observedGeneration == nil or (generation ~= nil and status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to check the tool"
  return hs
end

local ready = nil
if status.conditions ~= nil then
  for _, c in ipairs(status.conditions) do
    if c.type == "Ready" then
      ready = c
    end
  end
end

if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
else
  hs.status = "Degraded"
end
if ready ~= nil and ready.message ~= nil then
  hs.message = ready.message
end
return hs
