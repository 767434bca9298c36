-- Argo CD health of an agentgate.dev/AgentJob (resource.customizations.health.agentgate.dev_AgentJob).
-- Written for Lua 5.1, the dialect of Argo CD's gopher-lua; tests/health.rs runs it on objects
-- the operator wrote.
--   Progressing  the operator has not seen the current spec yet, or the job is being estimated
--                or runs
--   Suspended    the job waits for people (approvals) or for capacity, tools or quota
--   Healthy      Succeeded
--   Degraded     Failed or Rejected
local hs = {}

local function condition(status, type)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == type then
      return c
    end
  end
  return nil
end

local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to estimate the job"
  return hs
end

local generation = obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local ready = condition(status, "Ready")
local phase = status.phase
hs.message = phase
if ready ~= nil and ready.message ~= nil and ready.message ~= "" then
  hs.message = phase .. ": " .. ready.message
end

if phase == "Succeeded" then
  hs.status = "Healthy"
elseif phase == "Failed" or phase == "Rejected" then
  hs.status = "Degraded"
elseif phase == "AwaitingApproval" or phase == "WaitingForResources" then
  hs.status = "Suspended"
else
  -- Pending, Estimated, Running, and phases newer than this script.
  hs.status = "Progressing"
end
return hs
